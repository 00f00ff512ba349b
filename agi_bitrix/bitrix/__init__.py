"""Bitrix24 REST: the client (HTTP, errors, deadline, batch), auth and payload models."""
