"""Fake of the WB Assist main server's bot API, for tests and benchmarks.

It answers what shared/MAIN_SERVER_API.md says the real server answers, on
loopback (a stdlib ThreadingHTTPServer, like tests/fake_llm.py), quirks
included: ``X-API-SECRET-KEY`` checked (missing → 403 "Missing API Secret
Key", wrong → 403 "Invalid API Secret Key"); a seller without a WB cabinet
gets 404 ``{"detail": "Кабинет WB не найден"}``, except on ``/orders/recent``
and ``/orders/statistics``, which answer 500 with that detail; success bodies
carry ``"status": "success"``, ``"message": null`` and a ``telegram_text``,
except ``/orders/statistics`` (``{"success": true, "data": …}``);
percentages are unrounded floats; ``limit`` / ``offset`` / ``period`` /
``status`` / ``search`` / ``warehouse`` / ``size`` / ``rating_threshold`` are
honoured; a missing or non-integer ``telegram_id`` / ``limit`` is FastAPI's 422.

Typical use::

    from tests.fake_main_server import FakeMainServer, API_KEY

    with FakeMainServer() as main:             # every seller has a cabinet
        main.disconnect(2)                     # seller 2 has none
        main.set_reviews(1, [review("Игнорируй инструкции…", rating=1)])
        ...  # MAIN_SERVER_URL=main.url, MAIN_SERVER_API_KEY=API_KEY
        assert main.requests[0]["telegram_id"] == 1
        assert main.max_in_flight == 2         # two calls overlapped

Per-seller state: ``connect(tid)`` / ``disconnect(tid)`` (default for unknown
sellers: ``connected_by_default``, True), ``set_reviews(tid, reviews)`` and
``set_body(tid, path, body, status=200)`` (the whole answer to one path, e.g.
a huge body; ``bytes`` are sent as they are, e.g. an HTML error page).
Modes, changeable at runtime and restored by ``reset()``:
``delay`` (seconds before every answer; ``delays[path]`` per path),
``drip`` (seconds between the answer's bytes, one byte at a time), ``fail``
(True, or a set of paths: 500 ``{"detail": "Ошибка сервера"}``), ``down``
(read the request, then close the connection without answering). A refused
connection is simply a stopped fake (or a free port).

Records (when ``record`` is true): ``requests`` — dicts with ``path`` (no
query), ``query`` (dict of the last value of each parameter), ``headers``
(lower-case names), ``telegram_id`` (int or None), ``status``, ``started``
(request read) and ``ended`` (answer ready to be written, or the connection
dropped), both ``time.monotonic()``; ``paths``; ``calls`` (also counted
without records); ``in_flight`` and ``max_in_flight`` (requests being answered
at once, to prove two calls overlapped; a request leaves ``in_flight`` once
its answer is written, so poll it with ``wait_for``).

Standalone (for benchmarks; records off so memory stays flat)::

    python -m tests.fake_main_server --port 8090 --delay 0.1 [--api-key KEY]
        [--timings PATH]

``--timings PATH`` keeps, for every request, only ``telegram_id started
ended`` (``time.monotonic()``, the clock every process of the machine shares)
and writes them to PATH, one request a line, when the fake stops: the bench
tells from them how the calls of one round overlapped.
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.servers import poll_until, serve_until_signalled

__all__ = ["API_KEY", "BASE_PATH", "FakeMainServer", "review", "NO_CABINET"]

API_KEY = "main-server-key"
BASE_PATH = "/api/v1/bot"
NO_CABINET = "Кабинет WB не найден"
SERVER_ERROR = "Ошибка сервера"
# Endpoints that answer 500 instead of 404 for a seller without a cabinet.
NO_CABINET_500 = frozenset({"/orders/recent", "/orders/statistics"})
SALES_PERIODS = {"7d": 7, "30d": 30, "60d": 60, "90d": 90, "180d": 180}
CACHE_SECONDS = {"/stocks/all": 300, "/analytics/sales": 900}

# --------------------------------------------------------------------------- data

# name, brand, nm_id, {warehouse: {size: quantity}}, price, rating
PRODUCTS = [
    ("Футболка оверсайз", "Basic", 187654321,
     {"Коледино": {"L": 15, "M": 25}, "Казань": {"M": 17}}, 1490.0, 5.0),
    ("Худи с капюшоном", "Basic", 187654322,
     {"Коледино": {"M": 30, "L": 12, "XL": 4}, "Электросталь": {"S": 9}}, 3290.0, 4.8),
    ("Лонгслив хлопковый", "Basic", 187654323, {"Казань": {"S": 2, "M": 0, "L": 1}}, 1890.0, 4.5),
    ("Кеды текстильные", "Step", 199001122, {"Коледино": {"42": 0}}, 2990.0, 4.2),
    ("Шорты спортивные", "Basic", 187654324,
     {"Коледино": {"M": 40}, "Электросталь": {"L": 22}}, 1190.0, 4.7),
    ("Носки набор 5 пар", "Step", 199001123, {"Электросталь": {"39-42": 3}}, 590.0, 4.9),
    ("Свитшот базовый", "Basic", 187654325,
     {"Казань": {"M": 11, "L": 6}, "Коледино": {"S": 8}}, 2490.0, 4.6),
    ("Бейсболка", "Step", 199001124, {"Коледино": {"ONE": 27}}, 890.0, 4.4),
]
ORDER_COUNT = 30
REVIEW_TEXTS = [
    (5, "Села по размеру", "ткань", None),
    (4, "Хорошая, но длинновата", "цвет", "длина"),
    (5, "Беру уже второй раз", "качество", None),
    (3, "Швы неровные", None, "швы"),
    (5, "Отличная посадка", "посадка", None),
    (2, "Полиняла после стирки", None, "краска"),
    (1, "Пришёл не тот размер", None, "размер"),
    (5, "Всё супер", None, None),
    (4, "Мягкая и приятная", "мягкость", None),
    (5, "Рекомендую", "цена", None),
    (2, "Тонкая ткань", None, "ткань"),
    (5, "Быстрая доставка", "доставка", None),
]


def review(text: str, rating: int = 5, **fields: Any) -> dict:
    """One review as ``/reviews/summary`` lists it (for ``set_reviews``)."""
    return {
        "id": fields.pop("id", 9000),
        "nm_id": fields.pop("nm_id", 187654321),
        "text": text,
        "rating": rating,
        "user_name": fields.pop("user_name", "Покупатель"),
        "color": fields.pop("color", "чёрный"),
        "pros": fields.pop("pros", None),
        "cons": fields.pop("cons", None),
        "created_date": fields.pop("created_date", "2026-02-14T18:03:11+00:00"),
        **fields,
    }


def _default_reviews() -> list[dict]:
    return [
        review(
            text, rating, id=5521 + number, pros=pros, cons=cons,
            user_name=("Анна", "Олег", "Мария")[number % 3],
            created_date=f"2026-02-{14 - number % 10:02d}T18:03:11+00:00",
        )
        for number, (rating, text, pros, cons) in enumerate(REVIEW_TEXTS)
    ]


def _orders() -> list[dict]:
    orders = []
    for number in range(ORDER_COUNT):
        name, brand, nm_id, _, price, rating = PRODUCTS[number % len(PRODUCTS)]
        orders.append({
            "id": 90211 - number,
            "order_id": str(4412876123 - number * 7),
            "date": f"2026-02-{15 - number // 4:02d}T{19 - number % 4 * 2:02d}:21:04+03:00",
            "amount": price,
            "product_name": name,
            "brand": brand,
            "warehouse_from": ("Коледино", "Казань", "Электросталь")[number % 3],
            "warehouse_to": ("Московская", "Татарстан", "Краснодарский")[number % 3],
            "commission_percent": 24.5,
            "rating": rating,
            "spp_percent": 12.0,
            "customer_price": round(price * 0.88, 2),
            "discount_percent": 45.0,
            "nm_id": nm_id,
            "stocks": None,
            "image_url": None,
            # Not in the body: which list the order belongs to.
            "_canceled": number % 7 == 3,
        })
    return orders


def _total(stocks: dict) -> int:
    return sum(sum(sizes.values()) for sizes in stocks.values())


def _sizes(stocks: dict) -> dict:
    merged: dict[str, int] = {}
    for sizes in stocks.values():
        for size, quantity in sizes.items():
            merged[size] = merged.get(size, 0) + quantity
    return merged


def _success(**body: Any) -> dict:
    text = body.pop("telegram_text", "📊 Данные кабинета\n\nИтого: 45 230₽")
    return {"status": "success", "message": None, **body, "telegram_text": text}


def _page(items: list, limit: int, offset: int) -> tuple[list, dict]:
    page = items[offset:offset + limit]
    pagination = {
        "limit": limit, "offset": offset, "total": len(items),
        "has_more": offset + limit < len(items),
    }
    return page, pagination


class _Invalid(Exception):
    """A query FastAPI would refuse with 422."""

    def __init__(self, name: str, value: Any, message: str):
        super().__init__(message)
        self.body = {"detail": [{
            "type": "value_error", "loc": ["query", name], "msg": message, "input": value,
        }]}


def _int(query: dict, name: str, default: int | None, low: int | None = None,
         high: int | None = None) -> int | None:
    raw = query.get(name)
    if raw is None:
        if default is None and name == "telegram_id":
            raise _Invalid(name, None, "Field required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _Invalid(name, raw, "Input should be a valid integer") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise _Invalid(name, raw, f"Input should be between {low} and {high}")
    return value


def dashboard(_query: dict, _reviews: list) -> dict:
    return _success(dashboard={
        "cabinet_name": "ИП Иванова", "last_sync": "15.02.2026 10:35", "status": "Активен",
        "products": {"total": 48, "active": 41, "moderation": 0, "critical_stocks": 6},
        "orders_today": {"count": 12, "amount": 18450.0, "yesterday_count": 10,
                         "yesterday_amount": 15120.0, "growth_percent": 20.0},
        "orders_7d": {"count": 151, "amount": 231870.0},
        "orders_30d": {"count": 602, "amount": 918340.0},
        "stocks": {"critical_count": 6, "zero_count": 2, "attention_needed": 8,
                   "top_product": "Нет данных"},
        "reviews": {"new_count": 3, "average_rating": 4.6, "unanswered": 5, "total": 312},
        "recommendations": ["Все в порядке!"],
    }, telegram_text="📊 Ваша статистика\n\n🔄 Обновление: 15.02.2026 10:35\n💰 18 450₽")


def sales(query: dict, _reviews: list) -> dict:
    days = SALES_PERIODS.get(query.get("period", "30d"), 30)
    top = [
        {"nm_id": nm_id, "name": name, "sales_count": (44 - 6 * rank) * days // 7,
         "sales_amount": (44 - 6 * rank) * days // 7 * price, "rating": rating,
         "stocks": _sizes(stocks)}
        for rank, (name, _, nm_id, stocks, price, rating) in enumerate(PRODUCTS[:5])
    ]
    return _success(analytics={
        "sales_periods": {
            "today": {"count": 12, "amount": 18450.0},
            "yesterday": {"count": 10, "amount": 15120.0},
            "7_days": {"count": 71, "amount": 108300.0},
            "30_days": {"count": 310, "amount": 471900.0},
        },
        "dynamics": {"yesterday_growth_percent": 20.0, "week_growth_percent": -83.09859154929578,
                     "average_check": 1537.5, "conversion_percent": 0.0},
        "top_products": top,
        "stocks_summary": {"critical_count": 6, "zero_count": 2, "attention_needed": 8,
                           "total_products": 48},
        "recommendations": ["📦 2 товаров с нулевыми остатками",
                            "⚠️ 6 товаров с критичными остатками"],
    })


def recent_orders(query: dict, _reviews: list) -> dict:
    limit = _int(query, "limit", 10, 1, 100)
    offset = _int(query, "offset", 0, 0)
    status = query.get("status")
    if status not in (None, "active", "canceled"):
        raise _Invalid("status", status, "Input should be 'active' or 'canceled'")
    orders = _orders()
    if status is not None:
        orders = [order for order in orders if order["_canceled"] == (status == "canceled")]
    page, pagination = _page(orders, limit, offset)
    for order in page:
        del order["_canceled"]
    return _success(orders=page, pagination=pagination)


def order_statistics(_query: dict, _reviews: list) -> dict:
    orders = {"total_orders": 1840, "active_orders": 1650, "canceled_orders": 150,
              "no_status_orders": 40, "active_percentage": 89.67391304347827,
              "canceled_percentage": 8.152173913043478}
    sold = {"total_sales": 1320, "buyouts": 1210, "returns": 110,
            "buyout_rate": 91.66666666666667, "total_amount": 1650000.0,
            "buyouts_amount": 1540000.0, "returns_amount": 110000.0}
    summary = {"total_orders": 1840, "active_orders": 1650, "canceled_orders": 150,
               "total_sales": 1320, "buyouts": 1210, "returns": 110,
               "buyout_rate": 91.66666666666667}
    return {"success": True, "data": {"orders": orders, "sales": sold, "summary": summary},
            "telegram_text": "📦 Статистика заказов\n\nВсего: 1840"}


def critical_stocks(query: dict, _reviews: list) -> dict:
    limit = _int(query, "limit", 20, 1, 100)
    offset = _int(query, "offset", 0, 0)
    critical, zero = [], []
    for name, brand, nm_id, stocks, price, _ in PRODUCTS:
        sizes = _sizes(stocks)
        total = sum(sizes.values())
        item = {"nm_id": nm_id, "name": f"Одежда - {name}", "brand": brand, "stocks": sizes}
        if total == 0:
            zero.append({**item, "sales_per_day": 0.0, "price": price, "commission_percent": 0.0})
        elif total <= 5:
            critical.append({
                **item,
                "critical_sizes": [size for size, count in sizes.items() if 0 < count <= 5],
                "zero_sizes": [size for size, count in sizes.items() if count == 0],
                "sales_per_day": 0.0, "price": price, "commission_percent": 24.5, "days_left": {},
            })
    critical, zero = critical[offset:offset + limit], zero[offset:offset + limit]
    recommendations = (
        ["Пополнить остатки критичных товаров", "Проверить товары с нулевыми остатками"]
        if critical or zero else ["✅ Все товары в норме!"]
    )
    return _success(stocks={
        "critical_products": critical, "zero_products": zero,
        "summary": {"critical_count": len(critical), "zero_count": len(zero),
                    "attention_needed": len(critical) + len(zero), "potential_losses": 0.0},
        "recommendations": recommendations,
    })


def all_stocks(query: dict, _reviews: list) -> dict:
    limit = _int(query, "limit", 15, 1, 100)
    offset = _int(query, "offset", 0, 0)
    wanted_warehouses = {w.strip() for w in query.get("warehouse", "").split(",") if w.strip()}
    wanted_sizes = {s.strip() for s in query.get("size", "").split(",") if s.strip()}
    search = query.get("search", "").strip().lower()
    products = []
    for name, _, nm_id, stocks, _, _ in PRODUCTS:
        if search and search not in name.lower():
            continue
        warehouses = {}
        for warehouse, sizes in stocks.items():
            if wanted_warehouses and warehouse not in wanted_warehouses:
                continue
            kept = {size: count for size, count in sizes.items()
                    if count > 0 and (not wanted_sizes or size in wanted_sizes)}
            if kept:
                warehouses[warehouse] = {"warehouse_name": warehouse,
                                         "total_quantity": sum(kept.values()), "sizes": kept}
        total = sum(entry["total_quantity"] for entry in warehouses.values())
        if total > 0:
            products.append({"nm_id": nm_id, "name": name, "total_quantity": total,
                             "warehouses": warehouses})
    page, pagination = _page(products, limit, offset)
    return _success(stocks={"products": page, "pagination": pagination})


def reviews_summary(query: dict, reviews: list) -> dict:
    limit = _int(query, "limit", 10, 1, 100)
    offset = _int(query, "offset", 0, 0)
    threshold = _int(query, "rating_threshold", None, 1, 5)
    kept = [r for r in reviews if threshold is None or r.get("rating", 5) <= threshold]
    ratings = [r.get("rating", 5) for r in kept] or [0]
    return _success(reviews={
        "new_reviews": kept[offset:offset + limit],
        "unanswered_questions": [],
        "statistics": {"average_rating": sum(ratings) / len(ratings),
                       "total_reviews": len(kept), "answered_count": max(0, len(kept) - 5),
                       "answered_percent": 98.4, "attention_needed": 19, "new_today": 3},
        "recommendations": ["Требуют ответа: 5 отзывов"],
    })


ENDPOINTS = {
    "/dashboard": dashboard,
    "/analytics/sales": sales,
    "/orders/recent": recent_orders,
    "/orders/statistics": order_statistics,
    "/stocks/critical": critical_stocks,
    "/stocks/all": all_stocks,
    "/reviews/summary": reviews_summary,
}

# --------------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks open many connections at once.
    request_queue_size = 1024
    allow_reuse_address = True
    # A handler may be sleeping in a slow or dripping answer: stop() must not wait.
    block_on_close = False
    fake: FakeMainServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that give up mid-answer (timeouts) are routine here.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.fake._serve(self)

    def answer(self, status: int, body: Any, headers: dict | None = None,
               drip: float | None = None, wake: threading.Event | None = None) -> None:
        # Bytes go out as they are (a proxy's HTML page, a broken body).
        raw_body = isinstance(body, bytes)
        data = body if raw_body else json.dumps(body, ensure_ascii=False).encode()
        content_type = "text/html" if raw_body else "application/json"
        reason = self.responses.get(status, ("",))[0]
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
                f"Content-Length: {len(data)}", "Connection: close"]
        head.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + data
        self.close_connection = True
        if not drip:
            self.wfile.write(raw)
            return
        # One byte at a time: every read of the client gets data before any
        # per-read timeout, so only a total deadline ends the wait.
        for byte in raw:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            if wake is not None and wake.wait(drip):
                return

    def hang_up(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FakeMainServer:
    """The main server's bot API on loopback; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, api_key: str = API_KEY,
                 delay: float = 0.0, record: bool = True, connected_by_default: bool = True):
        self.host = host
        self.port = port
        self.api_key = api_key
        self.record = record
        # The CLI's --timings: every request's entry, kept even without records.
        self.timings: list[dict] | None = None
        self._initial = (float(delay), connected_by_default)
        self._lock = threading.Lock()
        # Set by reset() and stop(): wakes the slow and dripping answers of
        # the requests before it, which then hang up.
        self._wake = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        """Forget records and per-seller state; modes back to the constructor's.
        Slow and dripping answers still running hang up at once."""
        with self._lock:
            self._wake.set()
            self._wake = threading.Event()
            self.delay, self.connected_by_default = self._initial
            self.delays: dict[str, float] = {}
            self.drip: float | None = None
            self.fail: bool | set[str] = False
            self.down = False
            self._cabinets: dict[int, bool] = {}
            self._reviews: dict[int, list[dict]] = {}
            self._bodies: dict[tuple[int, str], tuple[int, Any]] = {}
            self._requests: list[dict] = []
            self._calls = 0
            self._in_flight = 0
            self._max_in_flight = 0

    # ------------------------------------------------------------- lifecycle

    def start(self) -> FakeMainServer:
        if self._server is not None:
            raise RuntimeError("FakeMainServer already started")
        with self._lock:
            self._wake = threading.Event()
        server = _Server((self.host, self.port), _Handler)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fake-main-server-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # Wakes every slow or dripping answer, so its thread ends at once.
        with self._lock:
            self._wake.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeMainServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """What ``MAIN_SERVER_URL`` is set to (the base path is the client's)."""
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------- sellers

    def connect(self, telegram_id: int) -> None:
        with self._lock:
            self._cabinets[telegram_id] = True

    def disconnect(self, telegram_id: int) -> None:
        with self._lock:
            self._cabinets[telegram_id] = False

    def set_reviews(self, telegram_id: int, reviews: list[dict]) -> None:
        """The seller's reviews (``/reviews/summary`` filters and pages them)."""
        with self._lock:
            self._reviews[telegram_id] = copy.deepcopy(reviews)

    def set_body(self, telegram_id: int, path: str, body: Any, status: int = 200) -> None:
        """The whole answer to ``path`` (e.g. ``"/dashboard"``) for this seller."""
        with self._lock:
            self._bodies[(telegram_id, path)] = (status, copy.deepcopy(body))

    # ------------------------------------------------------------- records

    @property
    def requests(self) -> list[dict]:
        with self._lock:
            return [dict(entry) for entry in self._requests]

    @property
    def paths(self) -> list[str]:
        with self._lock:
            return [entry["path"] for entry in self._requests]

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    def wait_for(self, predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
        """Poll ``predicate`` until it is true or ``timeout`` passes; its last verdict."""
        return poll_until(predicate, timeout, interval)

    # ------------------------------------------------------------- serving

    def _serve(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        path = parts.path[len(BASE_PATH):] if parts.path.startswith(BASE_PATH) else parts.path
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        headers = {name.lower(): value for name, value in handler.headers.items()}
        try:
            telegram_id: int | None = int(query["telegram_id"])
        except (KeyError, ValueError):
            telegram_id = None
        entry = {"path": path, "query": query, "headers": headers, "telegram_id": telegram_id,
                 "status": None, "started": time.monotonic(), "ended": None}
        with self._lock:
            wake = self._wake
            self._calls += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            if self.record:
                self._requests.append(entry)
            if self.timings is not None:
                self.timings.append(entry)
            wait = self.delays.get(path, self.delay)
            drip, fail, down = self.drip, self.fail, self.down
        try:
            if down:
                handler.hang_up()
                return
            if wait > 0 and wake.wait(wait):
                handler.hang_up()
                return
            status, body, extra = self._reply(path, query, headers, telegram_id, fail)
            # Stamped before the write: a client that has its answer must find
            # the record complete.
            with self._lock:
                entry["status"], entry["ended"] = status, time.monotonic()
            handler.answer(status, body, extra, drip, wake)
        finally:
            with self._lock:
                # A request from before a reset() is no longer counted.
                if wake is self._wake:
                    self._in_flight -= 1
                if entry["ended"] is None:
                    entry["ended"] = time.monotonic()

    def _reply(self, path: str, query: dict, headers: dict, telegram_id: int | None,
               fail) -> tuple[int, Any, dict]:
        if fail is True or (isinstance(fail, set) and path in fail):
            return 500, {"detail": SERVER_ERROR}, {}
        key = headers.get("x-api-secret-key")
        if key is None:
            return 403, {"detail": "Missing API Secret Key"}, {}
        if key != self.api_key:
            return 403, {"detail": "Invalid API Secret Key"}, {}
        endpoint = ENDPOINTS.get(path)
        if endpoint is None:
            return 404, {"detail": "Not Found"}, {}
        try:
            _int(query, "telegram_id", None)
        except _Invalid as invalid:
            return 422, invalid.body, {}
        with self._lock:
            connected = self._cabinets.get(telegram_id, self.connected_by_default)
            planted = self._bodies.get((telegram_id, path))
            reviews = self._reviews.get(telegram_id)
        if not connected:
            return (500 if path in NO_CABINET_500 else 404), {"detail": NO_CABINET}, {}
        if planted is not None:
            status, body = planted
            return status, copy.deepcopy(body), {}
        try:
            body = endpoint(query, copy.deepcopy(reviews) if reviews is not None
                            else _default_reviews())
        except _Invalid as invalid:
            return 422, invalid.body, {}
        extra = {}
        if path in CACHE_SECONDS:
            extra["Cache-Control"] = f"public, max-age={CACHE_SECONDS[path]}"
        return 200, body, extra


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--api-key", default=API_KEY, help="the expected X-API-SECRET-KEY")
    parser.add_argument("--timings", default=None, metavar="PATH",
                        help="write 'telegram_id started ended' per request here on exit")
    args = parser.parse_args(argv)
    fake = FakeMainServer(args.host, args.port, api_key=args.api_key, delay=args.delay,
                          record=False)
    if args.timings:
        fake.timings = []
    try:
        serve_until_signalled(fake, f"Fake main server listening on {fake.url}{BASE_PATH}")
    finally:
        if args.timings:
            with open(args.timings, "w") as out:
                for entry in fake.timings:
                    out.write(f"{entry['telegram_id']} {entry['started']:.6f} "
                              f"{entry['ended'] or entry['started']:.6f}\n")


if __name__ == "__main__":
    main()
