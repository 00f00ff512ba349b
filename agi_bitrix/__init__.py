"""agi-bitrix: every Asterisk call in Bitrix24."""

__version__ = "0.1.0"
