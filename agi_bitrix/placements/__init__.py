"""Bitrix24 call-card widgets: the auto-dialer's calls marked inside Bitrix24 itself.

Two placements, both served by `agi-bitrix serve` under `[placements] public_url`:

- PAGE_BACKGROUND_WORKER (`placement/worker`): an invisible frame on every Bitrix24 page. When a
  call card opens (`BackgroundCallCard::initialized`) it asks `placement/lookup` whether this is a
  dialer attempt of this operator and, if so, sets the card's title and status text.
- CALL_CARD (`placement/card`): a tab in the call card with the task, its attempts and the client's
  local time, or for an ordinary call the client's responsible manager and the last calls.

Every request proves the operator with the frame's own AUTH_ID (identity.py); pages are rendered
with autoescaping (pages.py); what a card shows comes from the dialer's local state (lookup.py).
"""
