"""Payloads of the telephony methods (Bitrix24 REST docs: telephony.externalcall.*), as plain dicts.

A call step builds one and journals it. Built as a pydantic model it cost a process-mode step
about a third of its CPU (pydantic's import and the model's validator) for values the step made
itself; tests/test_payloads.py holds every builder here to the pydantic models of these methods.
Like the models' dump, a builder leaves out what is None and keeps the defaults.
"""
from __future__ import annotations

from datetime import datetime
from enum import IntEnum
from typing import Any, Dict, Optional

REGISTER = "telephony.externalcall.register"
FINISH = "telephony.externalcall.finish"
SHOW = "telephony.externalcall.show"
HIDE = "telephony.externalcall.hide"
ATTACH_RECORD = "telephony.externalcall.attachRecord"
SEARCH_CRM = "telephony.externalcall.searchCrmEntities"


class CallType(IntEnum):
    OUTGOING = 1
    INCOMING = 2
    INCOMING_REDIRECTED = 3
    CALLBACK = 4
    INFO = 5


def _present(fields: Dict[str, Any]) -> Dict[str, Any]:
    return {k: int(v) if isinstance(v, IntEnum) else v for k, v in fields.items() if v is not None}


# The fields in the REST docs' order and case, so `register(**fields)` reads like the request.
def register(*, USER_ID: Optional[int] = None, USER_PHONE_INNER: Optional[str] = None, PHONE_NUMBER: str,
             TYPE: CallType, CALL_START_DATE: str, CRM_CREATE: int = 0, CRM_ENTITY_TYPE: Optional[str] = None,
             CRM_ENTITY_ID: Optional[int] = None, SHOW: int = 1, LINE_NUMBER: Optional[str] = None,
             EXTERNAL_CALL_ID: Optional[str] = None) -> Dict[str, Any]:
    return _present(dict(USER_ID=USER_ID, USER_PHONE_INNER=USER_PHONE_INNER, PHONE_NUMBER=PHONE_NUMBER, TYPE=TYPE,
                         CALL_START_DATE=CALL_START_DATE, CRM_CREATE=CRM_CREATE, CRM_ENTITY_TYPE=CRM_ENTITY_TYPE,
                         CRM_ENTITY_ID=CRM_ENTITY_ID, SHOW=SHOW, LINE_NUMBER=LINE_NUMBER,
                         EXTERNAL_CALL_ID=EXTERNAL_CALL_ID))


def finish(*, CALL_ID: str, USER_ID: Optional[int] = None, USER_PHONE_INNER: Optional[str] = None, DURATION: int,
           STATUS_CODE: str, FAILED_REASON: Optional[str] = None, ADD_TO_CHAT: int = 1) -> Dict[str, Any]:
    return _present(dict(CALL_ID=CALL_ID, USER_ID=USER_ID, USER_PHONE_INNER=USER_PHONE_INNER, DURATION=DURATION,
                         STATUS_CODE=STATUS_CODE, FAILED_REASON=FAILED_REASON, ADD_TO_CHAT=ADD_TO_CHAT))


def iso(ts: float) -> str:
    """ISO 8601 with the local offset (register refuses a date without one)."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def call_id_of(result: Any) -> str:
    if isinstance(result, dict) and isinstance(result.get("CALL_ID"), str) and result["CALL_ID"]:
        return result["CALL_ID"]
    raise ValueError("register answered without a CALL_ID")
