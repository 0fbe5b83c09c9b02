"""Every exception tokenfirewall raises derives from :class:`TokenFirewallError`."""

from __future__ import annotations


class TokenFirewallError(Exception):
    """Root of all tokenfirewall errors."""


class ConfigurationError(TokenFirewallError, ValueError):
    """The library was configured with values it cannot work with."""


class InvalidUsageError(TokenFirewallError, ValueError):
    """A usage or reservation amount is negative, non-integer or absurdly large."""


class StorageUnavailableError(TokenFirewallError):
    """The budget store could not be reached within its timeout."""


class RequestTooLargeError(TokenFirewallError):
    """A request body exceeded the configured size limit."""


class NotInRequestError(TokenFirewallError, RuntimeError):
    """``record_usage`` was called outside a metered request."""
