"""`agi-bitrix service`: one long-lived process for everything that is not a one-shot command.

- FastAGI (`[service] fastagi`): the call steps, by the same controllers and dispatcher as process
  mode, one thread per connection; a step costs milliseconds instead of a Python start.
- The outbox deliverer and, in OAuth mode, the offline-events poll (what `agi-bitrix worker` does).
- The HTTP handler of `agi-bitrix serve` on `[events] listen`, with /healthz and /metrics.
- The auto-dialer loop, when `[service] dialer = yes` (what `agi-bitrix dialer run` does).

Shared by all of it: the settings (re-read by `reload`, i.e. SIGHUP), the log (reopened by
`reload`), one pool of kept-alive HTTPS connections to the portal, one OAuth auth object (its
refresh single-flight), and a pool of database connections for the call steps.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from agi_bitrix import dispatcher
from agi_bitrix import log as log_mod
from agi_bitrix import settings as settings_mod
from agi_bitrix.agi.session import AGISession
from agi_bitrix.controllers import EVENTS, Refused
from agi_bitrix.service.courier import SETTLE_GRACE, Courier, is_urgent, roomy
from agi_bitrix.service.fastagi import ENV_TIMEOUT, FastAGIServer
from agi_bitrix.service.metrics import Metrics

STOP_GRACE = 30.0          # seconds SIGTERM waits for the steps in flight
PORTAL_PROBE_AFTER = 60.0  # with no REST traffic for this long, the deliverer asks the portal once
HEALTH_STALE = 120.0       # a deliverer silent for this long (beyond its interval) is not alive
POOLED_SHARED = 32         # idle connections to the shared store kept for the next steps


class ListenError(Exception):
    """An address of the service is taken or not ours; the message names it."""


class Service:
    poll = 0.5  # seconds between the accepting threads' looks at whether the service stops

    def __init__(self, settings_path: Optional[str] = None, env_timeout: float = ENV_TIMEOUT) -> None:
        self.settings_path = settings_path
        self.settings = settings_mod.load(settings_path)  # SettingsError: the command says why
        self.log = log_mod.configure(self.settings.logging.file, self.settings.logging.level,
                                     self.settings.secrets())
        self.metrics = Metrics(self._outbox_status)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._stores: List[Any] = []
        self._shared: List[Any] = []  # idle connections to the shared store (PostgreSQL)
        # The threads' writers queue here for the database's one write lock (store.py, Store).
        self._write_lock = threading.RLock()
        self._auth: Any = None
        self._auth_key: Tuple[Any, ...] = ()
        self.http = self._new_http(self.settings)
        self.portal: Dict[str, Any] = {"ok": None, "at": float("-inf"), "reason": "no request yet"}
        self.deliverer_beat = 0.0
        # The one deliverer of the steps' journal: requests shared among calls (courier.py).
        self.courier = Courier(lambda: self.settings.service.batch_window)
        self.dialer_note = ""
        from agi_bitrix.commands.serve import SharedAMI

        self.ami = SharedAMI(self.settings)
        listen = self.settings.service.fastagi
        try:
            self.fastagi = FastAGIServer(listen, self.serve_step, lambda: self.log,
                                         lambda: self.settings.service.allowed(),
                                         lambda: self.settings.service.max_connections, self.metrics,
                                         env_timeout=env_timeout)
        except OSError as exc:
            raise ListenError(f"cannot listen on {listen} ([service] fastagi): {exc.strerror or exc}") from None
        listen = self.settings.events.listen
        try:
            self.web = self._http_server(listen)
        except OSError as exc:
            self.fastagi.sock.close()
            raise ListenError(f"cannot listen on {listen} ([events] listen): {exc.strerror or exc}") from None

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        # Import what the steps use now, so the first call after a start is as fast as the rest.
        import importlib

        for module in list(EVENTS.values()) + ["agi_bitrix.outbox", "agi_bitrix.bitrix.factory"]:
            importlib.import_module(module)
        self._spawn("fastagi", lambda: self.fastagi.serve_forever(self.poll))
        self._spawn("http", lambda: self.web.serve_forever(poll_interval=self.poll))
        self._spawn("deliverer", self._deliverer)
        if self.settings.service.dialer:
            self._spawn("dialer", self._dialer)
        self.log.info("service_started", fastagi="%s:%d" % self.fastagi.address[:2],
                      http="%s:%d" % self.web.server_address[:2], dialer=self.settings.service.dialer)

    def stop(self) -> None:
        """SIGTERM: take no new steps, let the ones in flight finish, then stop the loops."""
        self.fastagi.stop_accepting()
        finished = self.fastagi.wait_idle(STOP_GRACE)
        self._stop.set()
        self.courier.wake()
        self.web.shutdown()
        for thread in self._threads:
            thread.join(STOP_GRACE)
        self.web.server_close()
        with self._lock:
            stores, self._stores = self._stores + self._shared, []
            self._shared = []
        for store in stores:
            store.close()
        self.log.info("service_stopped", steps_cut=0 if finished else self.fastagi.active)

    def reload(self) -> bool:
        """SIGHUP (`systemctl reload`): settings read again, the log reopened (after logrotate).

        Bad settings keep the ones in force, with the reason logged. The FastAGI and HTTP addresses
        and whether the dialer runs take effect at the next start.
        """
        try:
            settings = settings_mod.load(self.settings_path)
        except settings_mod.SettingsError as exc:
            self.log.reopen(self.settings.logging.file, self.settings.logging.level, self.settings.secrets())
            self.log.error("service_reload", reason=f"{exc}; the settings in force stay")
            return False
        self.log.reopen(settings.logging.file, settings.logging.level, settings.secrets())
        with self._lock:
            old, self.settings = self.settings, settings
            stores = [] if old.storage.state_dir == settings.storage.state_dir else self._stores
            if stores:
                self._stores = []
            if old.service.max_connections != settings.service.max_connections:
                self.http = self._new_http(settings)
        for store in stores:
            store.close()
        self.ami.settings = settings
        self.web.RequestHandlerClass = self._handler(settings)
        notes = [f"[service] {k} changes at the next start" for k in ("fastagi", "dialer")
                 if getattr(old.service, k) != getattr(settings.service, k)]
        if old.events.listen != settings.events.listen:
            notes.append("[events] listen changes at the next start")
        self.log.info("service_reloaded", notes=notes or None)
        return True

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- the call steps (dispatcher.StepHost) -----------------------------------------------------------
    def serve_step(self, session: AGISession, started: float) -> None:
        event, args = dispatcher.network_request(session)
        result = dispatcher.serve(session, event, args, started, self)
        name = event.lower() if event.lower() in EVENTS else "unknown"
        self.metrics.steps.labels(name, result.status, "fastagi").inc()
        self.metrics.step_seconds.labels(name).observe(time.monotonic() - started)

    def logger(self) -> Any:
        return self.log

    def load_settings(self) -> Any:
        return self.settings

    def client(self, settings: Any) -> Any:
        from agi_bitrix.bitrix.factory import NotConfigured, make_client

        try:
            client = make_client(settings, http=self.http, auth=self._shared_auth(settings))
        except NotConfigured as exc:
            raise Refused(str(exc))
        client.observe = self._observe
        return client

    def store(self, settings: Any) -> Any:
        from agi_bitrix.store import Store

        if settings.storage.url:  # the shared store: pooled connections, one per step at a time
            from agi_bitrix.stores import open_store

            while True:
                with self._lock:
                    pooled = self._shared.pop() if self._shared else None
                if pooled is None:
                    return open_store(settings)
                if pooled.url == settings.storage.url and pooled.pbx == settings.storage.pbx_id and pooled.alive():
                    return pooled
                pooled.close()
        with self._lock:
            store = self._stores.pop() if self._stores else None
        return store if store is not None else Store(settings.storage.state_dir, pooled=True, write_lock=self._write_lock)

    def close(self, store: Any) -> None:
        if getattr(store, "engine", "sqlite") == "postgresql":
            store.copy_to_journal()
            with self._lock:
                if not self._stop.is_set() and len(self._shared) < POOLED_SHARED:
                    self._shared.append(store)
                    return
            store.close()
            return
        if getattr(store, "pbx", ""):
            store.close()  # the local journal a step fell back on
            return
        reusable = not store.db.in_transaction  # never hand a half-done transaction to the next step
        with self._lock:
            if reusable and str(store.path.parent) == self.settings.storage.state_dir and not self._stop.is_set():
                self._stores.append(store)
                return
        store.close()

    def release(self, ctx: Any, in_memory: bool) -> Optional[float]:
        """The step's status is on the channel: close the connection now so the call goes on (the
        `answer` step holds the bridge), then deliver in this thread with a budget of its own (its
        state, in the database or in memory, stays with it). No fork: a child of this process
        would inherit every live AGI socket."""
        ctx.session.detach()
        return ctx.settings.bitrix24.timeout

    def outbox_owner(self) -> Optional[str]:
        """The steps' entries are the courier's to deliver (its lease), except on the shared store,
        where each step delivers its own and the pass must not take them meanwhile."""
        return None if self.settings.storage.url else self.courier.owner

    def deliver(self, ctx: Any, keys: List[str]) -> None:
        """Hand the calls to the deliverer thread and wait for its answer within the step's budget,
        so that calls arriving together share requests. A step working from a copy in memory (the
        database could not be written) delivers itself."""
        if ctx.store.private or self._stop.is_set() or self.settings.storage.url:
            # On the shared store the deliverer is shared_pass (shared/deliver.py): the step
            # delivers its own calls, in one request per round.
            ctx.outbox.deliver_keys(keys, ctx.deadline, lease=ctx.lease)
            return
        waiting = ctx.store.pending_kinds(keys)
        if not waiting:
            return
        urgent = is_urgent(ctx.store, keys, waiting)
        ticket = self.courier.submit(keys, urgent, ctx.deadline.remaining(), roomy(ctx.outbox.client.limiter, urgent))
        # A request cut at the budget is settled a moment later (as in process mode, where the
        # step itself writes it down before it ends).
        ticket.done.wait(ctx.deadline.remaining() + SETTLE_GRACE)
        client = ctx.outbox.client  # what the step's log line says of the requests that carried it
        client.requests_made += ticket.requests
        client.portal_seconds += ticket.portal

    def _shared_auth(self, settings: Any) -> Any:
        from agi_bitrix.bitrix.factory import make_auth

        b24 = settings.bitrix24
        key = (b24.mode, b24.webhook_url, b24.portal_url, b24.client_id, b24.client_secret, b24.oauth_url,
               settings.storage.state_dir)
        with self._lock:
            if self._auth is not None and self._auth_key == key:
                return self._auth
        auth = make_auth(settings, threaded=True)  # NotConfigured (no tokens yet): asked again next step
        if auth.mode == "oauth":
            auth.on_refresh = self.metrics.refreshes.inc
        with self._lock:
            self._auth, self._auth_key = auth, key
        return auth

    def _new_http(self, settings: Any) -> Any:
        """One pool of kept-alive connections to the portal, as large as the steps served at once."""
        from agi_bitrix.bitrix.http import Pool

        return Pool(settings.service.max_connections + 4)

    def _observe(self, method: str, status: int) -> None:
        self.metrics.observe_request(method, status)
        ok = 0 < status < 500 or status == 503  # 503 QUERY_LIMIT_EXCEEDED: reachable, only busy
        self.portal = {"ok": ok, "at": time.monotonic(),
                       "reason": "" if ok else (f"HTTP {status} from the portal" if status else
                                                "no answer from the portal")}

    # -- the long-lived jobs ------------------------------------------------------------------------------
    def _deliverer(self) -> None:
        """The courier's thread: the steps' tickets at once, and every flush_interval a pass over
        what waits (with the worker's chores: calls never hung up, offline events, pruning)."""
        from agi_bitrix.bitrix.factory import NotConfigured, make_client
        from agi_bitrix.commands.outbox import FLUSH_REQUEST_TIMEOUT, PRUNE_EVERY, Every, prune_history
        from agi_bitrix.commands.worker import event_poller, one_chores, one_pass
        from agi_bitrix.outbox import Outbox
        from agi_bitrix.store import Store, StoreError

        store, outbox, made_for = None, None, None
        pruning = Every(PRUNE_EVERY)
        try:
            while not self._stop.is_set():
                self.deliverer_beat = time.monotonic()
                settings = self.settings
                wait = settings.service.flush_interval
                try:
                    if store is None or str(store.path.parent) != settings.storage.state_dir:
                        if store is not None:
                            store.close()
                        store, made_for = Store(settings.storage.state_dir, write_lock=self._write_lock), None
                    if made_for is not settings:  # settings reloaded: a client for them
                        client = make_client(settings, http=self.http, auth=self._shared_auth(settings))
                        client.timeout = max(settings.bitrix24.timeout, FLUSH_REQUEST_TIMEOUT)
                        client.observe = self._observe
                        outbox, made_for = Outbox(store, client, settings.calls.recording_url, self.courier.owner), \
                            settings
                        poller = event_poller(settings, outbox, self.log, self.ami)
                    if settings.storage.url:  # several PBXs: the shared store's pass (shared/deliver.py)
                        if time.monotonic() - self.portal["at"] > PORTAL_PROBE_AFTER:
                            self._probe_portal(outbox.client)
                        one_pass(settings, outbox, self.log, poller, pruning.due())
                        self._stop.wait(settings.service.flush_interval)
                        continue
                    if self.courier.pass_due():
                        if time.monotonic() - self.portal["at"] > PORTAL_PROBE_AFTER:
                            self._probe_portal(outbox.client)
                        one_chores(settings, outbox, self.log, poller)
                        if pruning.due():
                            prune_history(settings, store, self.log)
                    wait = self.courier.step(outbox, settings.service.flush_interval)
                    finished = self.courier.finished
                    if finished is not None and (finished.delivered or finished.dead or finished.stopped):
                        self.log.info("outbox_flush", calls=finished.calls, delivered=finished.delivered,
                                      dead=finished.dead, requests=finished.requests,
                                      stopped=finished.stopped or None,
                                      **{k: outbox.log[k] for k in ("delivery_errors", "dead_letters")
                                         if k in outbox.log})
                    if finished is not None:
                        outbox.log.clear()
                except (NotConfigured, StoreError) as exc:
                    self.log.error("worker_pass_failed", reason=str(exc))
                except Exception as exc:  # the deliverer must outlive any one pass
                    self.log.error("worker_pass_failed", reason=f"{type(exc).__name__}: {exc}")
                if not self._stop.is_set():
                    self.courier.sleep(min(wait, settings.service.flush_interval))
        finally:
            if store is not None:
                store.close()

    def _probe_portal(self, client: Any) -> None:
        from agi_bitrix.bitrix.errors import BitrixError

        try:
            client.call("scope")
        except BitrixError:
            pass  # the observer has noted it

    def _dialer(self) -> None:
        from agi_bitrix.bitrix.errors import BitrixError
        from agi_bitrix.bitrix.factory import make_client
        from agi_bitrix.commands.dialer import one_pass
        from agi_bitrix.dialer.engine import Dialer, DialerBusy, DialerLock
        from agi_bitrix.pbx.ami import AMIClient, AMIError
        from agi_bitrix.store import StoreError
        from agi_bitrix.stores import open_store

        settings = self.settings
        ast = settings.asterisk
        if not ast.ami_user:
            self.dialer_note = "set [asterisk] ami_user and ami_secret (the dialer dials through AMI)"
            self.log.error("dialer_pass", reason=self.dialer_note)
            return
        try:
            with DialerLock(settings.storage.state_dir):
                ami = AMIClient(ast.ami_host, ast.ami_port, ast.ami_user, ast.ami_secret)
                dialer: Any = None
                try:
                    client = make_client(settings, http=self.http, auth=self._shared_auth(settings))
                    client.timeout = max(settings.bitrix24.timeout, 10.0)
                    client.observe = self._observe
                    while not self._stop.is_set():
                        try:
                            if dialer is None:  # the shared store may be away at the start: tried each pass
                                try:
                                    store = open_store(settings, timeout=max(settings.storage.db_timeout, 5.0),
                                                       write_lock=self._write_lock)
                                except StoreError as exc:
                                    self.log.error("dialer_pass", reason=str(exc))
                                    raise
                                dialer = Dialer(settings, store, client, ami)
                            report = one_pass(dialer, self.log)
                            self.metrics.dialer_passes.inc()
                            for outcome in report.outcomes.values():
                                self.metrics.dialer_outcomes.labels(str(outcome)).inc()
                        except (BitrixError, AMIError, StoreError):
                            pass  # logged by one_pass; the next pass tries again
                        except Exception as exc:  # the loop must outlive any one pass
                            self.log.error("dialer_pass", reason=f"{type(exc).__name__}: {exc}")
                        self._stop.wait(self.settings.dialer.poll_interval)
                finally:
                    ami.close()
                    if dialer is not None:
                        dialer.store.close()
        except DialerBusy as exc:
            self.dialer_note = str(exc)
            self.log.error("dialer_pass", reason=str(exc))
        except Exception as exc:
            self.dialer_note = f"{type(exc).__name__}: {exc}"
            self.log.error("dialer_pass", reason=self.dialer_note)

    # -- HTTP: the event handler, /healthz, /metrics -------------------------------------------------------
    def _http_server(self, listen: str) -> Any:
        """The same bounded server as `agi-bitrix serve` (connection cap, request timeout): it is
        open to the network. Its limits change at the next start."""
        from agi_bitrix import http_server
        from agi_bitrix.commands.serve import limits_of

        return http_server.build(listen, self._handler(self.settings), limits_of(self.settings), self.log)

    def _handler(self, settings: Any) -> type:
        from agi_bitrix.commands.serve import make_handler
        from agi_bitrix.service.metrics import CONTENT_TYPE

        base = make_handler(settings, self.log, self.ami)
        service = self

        class Handler(base):  # type: ignore[misc, valid-type]
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    ready, reasons = service.health()
                    self._send(200 if ready else 503, "application/json",
                               _json({"ready": ready, "reasons": reasons}))
                elif path == "/metrics":
                    self._send(200, CONTENT_TYPE, service.metrics.render())
                else:
                    super().do_GET()

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def health(self) -> Tuple[bool, Dict[str, str]]:
        """Ready or not, and for each check what is wrong ('' = fine)."""
        settings = self.settings
        reasons: Dict[str, str] = {}
        portal = self.portal
        reasons["portal"] = ("" if portal["ok"] else portal["reason"] or "not reachable")
        reasons["store"] = self._store_problem(settings)
        if settings.asterisk.ami_user:
            try:
                client = self.ami()
                reasons["ami"] = "" if (client.connected or client.ping()) else "not connected"
            except Exception as exc:
                reasons["ami"] = f"not connected: {exc}"
        alive = any(t.name == "deliverer" and t.is_alive() for t in self._threads)
        late = time.monotonic() - self.deliverer_beat > settings.service.flush_interval + HEALTH_STALE
        reasons["deliverer"] = "" if alive and not late else ("not running" if not alive else "stuck in a pass")
        if settings.service.dialer:
            alive = any(t.name == "dialer" and t.is_alive() for t in self._threads)
            reasons["dialer"] = "" if alive else (self.dialer_note or "not running")
        return not any(reasons.values()), reasons

    def _store_problem(self, settings: Any) -> str:
        from agi_bitrix.store import Store, StoreError

        try:
            if settings.storage.url:  # the shared store too (steps go on with the journal without it)
                from agi_bitrix.stores import open_store

                open_store(settings).close()
            store = Store(settings.storage.state_dir)
        except StoreError as exc:
            return str(exc)
        try:
            store.db.execute("BEGIN IMMEDIATE")  # a write lock proves the database is writable
            store.db.execute("ROLLBACK")
            return ""
        except Exception as exc:
            return f"state database not writable: {exc}"
        finally:
            store.close()

    def _outbox_status(self) -> Optional[Dict[str, Any]]:
        from agi_bitrix.store import StoreError
        from agi_bitrix.stores import open_store

        try:
            store = open_store(self.settings)
        except StoreError:
            return None
        try:
            return store.outbox_status()
        finally:
            store.close()


def _json(data: Any) -> bytes:
    import json

    return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")
