"""The telephony payloads a call step journals, held to pydantic models of the REST methods.

The steps build them as plain dicts (bitrix/payloads.py: pydantic would cost every process-mode
step its import); these models are the methods' fields as Bitrix24's REST docs give them
(telephony.externalcall.register, telephony.externalcall.finish), and every builder must give
exactly what a model accepts and would send itself.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agi_bitrix.bitrix import payloads
from agi_bitrix.bitrix.payloads import CallType


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

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


def held(model: type, built: Dict[str, Any]) -> None:
    """`built` is valid for the model and exactly what the model itself would send."""
    values = dict(built)
    if "TYPE" in values:
        values["TYPE"] = CallType(values["TYPE"])
    assert model(**values).params() == built
    assert list(built) == [k for k in model.model_fields if k in built]  # the same order in the journal


@pytest.mark.parametrize("fields", [
    dict(USER_PHONE_INNER="101", PHONE_NUMBER="+79161234567", TYPE=payloads.CallType.INCOMING,
         CALL_START_DATE=payloads.iso(1795000000), CRM_CREATE=1, LINE_NUMBER="+74951234567",
         EXTERNAL_CALL_ID="1795000000.1", SHOW=1),
    dict(USER_PHONE_INNER="102", PHONE_NUMBER="0000", TYPE=payloads.CallType.OUTGOING,
         CALL_START_DATE=payloads.iso(1795000000), CRM_CREATE=0, LINE_NUMBER=None, EXTERNAL_CALL_ID="x-t2"),
    dict(USER_PHONE_INNER="101", PHONE_NUMBER="+79161234567", TYPE=payloads.CallType.CALLBACK,
         CALL_START_DATE=payloads.iso(1795000000), CRM_ENTITY_TYPE="CONTACT", CRM_ENTITY_ID=7, SHOW=0),
])
def test_register_is_what_the_model_sends(fields):
    built = payloads.register(**fields)
    held(Register, built)
    assert built["TYPE"] == int(fields["TYPE"]) and type(built["TYPE"]) is int


@pytest.mark.parametrize("fields", [
    dict(CALL_ID="", USER_PHONE_INNER="101", DURATION=42, STATUS_CODE="200"),
    dict(CALL_ID="externalCall.1", USER_PHONE_INNER="103", DURATION=0, STATUS_CODE="304", FAILED_REASON="NOANSWER"),
])
def test_finish_is_what_the_model_sends(fields):
    held(Finish, payloads.finish(**fields))


def test_the_models_refuse_what_a_builder_must_never_make():
    """The check above can fail: a wrong field, type or value is refused."""
    good = payloads.finish(CALL_ID="c", DURATION=1, STATUS_CODE="200")
    for bad in (dict(good, DURATION=-1), dict(good, DURATION="1"), dict(good, EXTRA=1)):
        with pytest.raises(ValidationError):
            Finish(**bad)
    with pytest.raises(ValidationError):
        Register(**dict(payloads.register(PHONE_NUMBER="", TYPE=payloads.CallType.INCOMING,
                                          CALL_START_DATE="x"), TYPE=CallType.INCOMING))
