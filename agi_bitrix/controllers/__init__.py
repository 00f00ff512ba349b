"""One module per AGI event. A controller reads the event, decides, and pushes payloads."""


class Refused(Exception):
    """The event cannot be carried out (bad input, unknown call): BITRIX_STATUS=ERROR, reason logged.

    `variables`: channel variables the dialplan still needs (e.g. an empty BITRIX_DIAL: nothing to
    dial). Kept here, light to import, so the dispatcher can use it before any controller is loaded.
    """

    def __init__(self, reason: str, variables: "dict[str, str] | None" = None) -> None:
        super().__init__(reason)
        self.variables = dict(variables or {})

# event name -> module; imported lazily so an event loads only what it needs.
EVENTS = {
    "incoming": "agi_bitrix.controllers.incoming",
    "outgoing": "agi_bitrix.controllers.outgoing",
    "answer": "agi_bitrix.controllers.answer",
    "hangup": "agi_bitrix.controllers.hangup",
    "dial": "agi_bitrix.controllers.dial",
    "transfer": "agi_bitrix.controllers.transfer",
    "click-answered": "agi_bitrix.controllers.click_answered",
    # the auto-dialer's dialplan (extensions.conf.sample, [bitrix-dialer])
    "dialer-answered": "agi_bitrix.controllers.dialer_answered",
    "dialer-connected": "agi_bitrix.controllers.dialer_connected",
    "dialer-failed": "agi_bitrix.controllers.dialer_failed",
}
