"""Payloads of the telephony methods, as pydantic models (Bitrix24 REST docs: telephony.externalcall.*)."""
from __future__ import annotations

from datetime import datetime
from enum import IntEnum
from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

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


class _Payload(BaseModel):
    # defer_build: a call step builds the validator of the payloads it sends, not of all of them.
    model_config = ConfigDict(extra="forbid", defer_build=True)

    def params(self) -> Dict[str, Any]:
        return self.model_dump(exclude_none=True, mode="json")


class Register(_Payload):
    USER_ID: Optional[int] = None
    USER_PHONE_INNER: Optional[str] = None
    PHONE_NUMBER: str = Field(min_length=1)
    TYPE: CallType
    CALL_START_DATE: str
    CRM_CREATE: int = 0
    CRM_ENTITY_TYPE: Optional[str] = None
    CRM_ENTITY_ID: Optional[int] = None
    SHOW: int = 1
    LINE_NUMBER: Optional[str] = None
    EXTERNAL_CALL_ID: Optional[str] = None


class Finish(_Payload):
    CALL_ID: str
    USER_ID: Optional[int] = None
    USER_PHONE_INNER: Optional[str] = None
    DURATION: int = Field(ge=0)
    STATUS_CODE: str
    FAILED_REASON: Optional[str] = None
    ADD_TO_CHAT: int = 1


class CardVisibility(_Payload):
    CALL_ID: str
    USER_ID: Union[int, List[int]]


class AttachRecord(_Payload):
    CALL_ID: str
    FILENAME: Optional[str] = None
    FILE_CONTENT: Optional[str] = None
    RECORD_URL: Optional[str] = None


def iso(ts: float) -> str:
    """ISO 8601 with the local offset (register refuses a date without one)."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def call_id_of(result: Any) -> str:
    if isinstance(result, dict) and isinstance(result.get("CALL_ID"), str) and result["CALL_ID"]:
        return result["CALL_ID"]
    raise ValueError("register answered without a CALL_ID")
