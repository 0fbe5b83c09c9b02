"""LLM API wire formats: request estimates and response usage."""

from tokenfirewall.providers.anthropic import AnthropicProvider
from tokenfirewall.providers.base import (
    MAX_USAGE_TOKENS,
    Estimate,
    Provider,
    ResponseObserver,
    Usage,
    get_provider,
)
from tokenfirewall.providers.generic import GenericProvider
from tokenfirewall.providers.openai import OpenAIProvider

__all__ = [
    "MAX_USAGE_TOKENS",
    "AnthropicProvider",
    "Estimate",
    "GenericProvider",
    "OpenAIProvider",
    "Provider",
    "ResponseObserver",
    "Usage",
    "get_provider",
]
