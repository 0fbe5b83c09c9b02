"""The providers that `get_provider` knows by name."""

from __future__ import annotations

from tokenfirewall.providers.anthropic import AnthropicProvider
from tokenfirewall.providers.base import Provider
from tokenfirewall.providers.generic import GenericProvider
from tokenfirewall.providers.openai import OpenAIProvider

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "generic": GenericProvider,
}
