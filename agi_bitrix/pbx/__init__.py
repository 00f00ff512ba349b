"""Talking to the PBX outside a call: the Asterisk Manager Interface (AMI) client."""
from __future__ import annotations

from .ami import (
    AMIAuthError,
    AMIClient,
    AMIConnectionError,
    AMIError,
    AMITimeout,
    Message,
    OriginateResult,
    PendingOriginate,
)

__all__ = [
    "AMIAuthError", "AMIClient", "AMIConnectionError", "AMIError", "AMITimeout",
    "Message", "OriginateResult", "PendingOriginate",
]
