"""The auto-dialer: works through the call tasks of a Bitrix24 workgroup."""
