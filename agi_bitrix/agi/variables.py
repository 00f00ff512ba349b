"""Channel variables agi-bitrix sets or reads, in one place (the README lists them)."""

STATUS = "BITRIX_STATUS"            # OK | QUEUED | ERROR
CALL_ID = "BITRIX_CALL_ID"          # Bitrix24 CALL_ID, empty when not known yet
RESPONSIBLE = "BITRIX_RESPONSIBLE"  # after `incoming`: inner number of the client's manager

LINKEDID = "CHANNEL(linkedid)"      # one call = one linkedid on every leg and event

def publish(session: object, status: str, call_id: str, responsible: "str | None" = None) -> None:
    """Set the contract's channel variables (dead-capable: safe after the caller hung up)."""
    session.set_variable(STATUS, status)  # type: ignore[attr-defined]
    session.set_variable(CALL_ID, call_id)  # type: ignore[attr-defined]
    if responsible is not None:  # only `incoming` says who the client's manager is
        session.set_variable(RESPONSIBLE, responsible)  # type: ignore[attr-defined]


OK = "OK"
QUEUED = "QUEUED"
ERROR = "ERROR"
