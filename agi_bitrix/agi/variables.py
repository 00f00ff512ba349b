"""Channel variables agi-bitrix sets or reads, in one place (CONTRACT.md §2)."""

STATUS = "BITRIX_STATUS"            # OK | QUEUED | ERROR
CALL_ID = "BITRIX_CALL_ID"          # Bitrix24 CALL_ID, empty when not known yet
RESPONSIBLE = "BITRIX_RESPONSIBLE"  # after `incoming`: inner number of the client's manager

LINKEDID = "CHANNEL(linkedid)"      # one call = one linkedid on every leg and event

OK = "OK"
QUEUED = "QUEUED"
ERROR = "ERROR"
