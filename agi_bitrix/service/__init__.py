"""The long-lived `agi-bitrix service` (FastAGI, jobs, HTTP) and its parts."""
