"""The `chronorec` command line: encode, recommend, feedback, import and model management over gRPC."""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from chronorec.client.client import (
    DEFAULT_TARGET,
    OVERRIDE_FIELDS,
    ChronorecClient,
    ChronorecClientError,
    FeedbackEvent,
    FeedbackResult,
)
from chronorec.client.convert import format_iso

FEEDBACK_BATCH = 500
IMPORT_ITEM_BATCH = 500
IMPORT_EVENT_BATCH = 1000
DEFAULT_TIMEOUT = 10.0
# Activation waits for a hot swap (re-encoding the whole catalog) and import streams a whole
# event log, so these get a longer default deadline than a single request.
LONG_TIMEOUT = 600.0
COMPONENTS_SHOWN = 4

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input discovered after parsing (e.g. a malformed events file)."""


# --------------------------------------------------------------------------------------------
# Table formatting
# --------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """An aligned text table: a header, a rule and one line per row.

    `align` has one character per column, "l" or "r"; by default columns whose every cell is a
    number are right-aligned. Floats print with 4 decimals, None as an empty cell.
    """
    rows = [list(row) for row in rows]
    width = len(headers)
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row has {len(row)} cells, header has {width}: {row!r}")
    if align is None:
        align = "".join(
            "r" if rows and all(_is_number(row[col]) or row[col] is None for row in rows) else "l"
            for col in range(width)
        )
    if len(align) != width or set(align) - {"l", "r"}:
        raise ValueError(f"align must be {width} characters of 'l'/'r', got {align!r}")
    cells = [[str(h) for h in headers]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(line[col]) for line in cells) for col in range(width)]

    def render(line: list[str]) -> str:
        parts = [text.rjust(w) if a == "r" else text.ljust(w) for text, w, a in zip(line, widths, align)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(cells[0]), rule] + [render(line) for line in cells[1:]])


def format_pairs(pairs: Iterable[tuple[str, Any]]) -> str:
    """Key/value lines with the keys padded to one width."""
    pairs = list(pairs)
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{key.ljust(width)}  {_cell(value)}".rstrip() for key, value in pairs)


def _is_number(value: Any) -> bool:
    # numbers.Real also admits numpy's scalars without importing numpy (a client-only install has none).
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.4f}"
    return str(value).replace("\n", " ")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_encode(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    result = client.encode(args.texts, timeout=args.timeout)
    shown = min(COMPONENTS_SHOWN, result.dimension)
    print(f"dimension {result.dimension}  model {result.model_version}", file=out)
    headers = ["#", "text"] + [f"v[{i}]" for i in range(shown)] + ["norm"]
    rows = [
        [number, _shorten(text, 40)] + [float(x) for x in vector[:shown]] + [math.hypot(*vector)]
        for number, (text, vector) in enumerate(zip(args.texts, result.vectors), start=1)
    ]
    print(format_table(headers, rows), file=out)


def cmd_recommend(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    overrides = {name: getattr(args, name) for name in OVERRIDE_FIELDS if getattr(args, name) is not None}
    result = client.recommend(
        user_id=args.user,
        k=args.k,
        at=args.at,
        exclude=args.exclude,
        categories=args.category,
        allow_repeats=args.allow_repeats,
        overrides=overrides or None,
        timeout=args.timeout,
    )
    print(
        f"user {args.user}  at {format_iso(result.at)}  model {result.model_version}  "
        f"history {result.history_length} events  recommendation {result.recommendation_id}",
        file=out,
    )
    _print_recommendations(result, out)


def _print_recommendations(result, out: TextIO) -> None:
    if not result.items:
        print("(no items)", file=out)
        return
    headers = ["rank", "item", "title", "score", "semantic", "cooc", "fresh", "trend", "because of"]
    rows = [
        [
            rank,
            item.item_id,
            _shorten(item.title, 40),
            item.score,
            item.semantic,
            item.cooccurrence,
            item.freshness,
            item.trend,
            _shorten(f"{item.history[0].title or item.history[0].item_id} ({item.history[0].contribution:.3f})", 40)
            if item.history
            else "",
        ]
        for rank, item in enumerate(result.items, start=1)
    ]
    align = "rllrrrrrl"
    if any(item.features for item in result.items):
        # A version with a learned ranker: the features that moved each item most.
        headers.append("ranker features")
        for row, item in zip(rows, result.items):
            row.append(_shorten(", ".join(f"{f.name} {f.contribution:+.2f}" for f in item.features[:2]), 48))
        align += "l"
    print(format_table(headers, rows, align=align), file=out)


def cmd_recommend_batch(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    batch = client.recommend_batch(args.users, k=args.k, at=args.at, categories=args.category, timeout=args.timeout)
    print(f"{len(batch.entries)} users, {batch.encoded_texts} history texts encoded together", file=out)
    for user, entry in zip(args.users, batch.entries):
        print(file=out)
        if not entry.ok:
            print(f"user {user}: {entry.code.name}: {entry.message}", file=out)
            continue
        result = entry.result
        print(f"user {user}  model {result.model_version}  history {result.history_length} events  "
              f"recommendation {result.recommendation_id}", file=out)
        _print_recommendations(result, out)


def cmd_similar(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    if (args.item is None) == (args.text is None):
        raise UsageError("similar: give an ITEM or --text, one of them")
    result = client.similar_items(
        args.item, text=args.text, k=args.k, at=args.at, exclude=args.exclude, categories=args.category,
        semantic_weight=args.semantic_weight, timeout=args.timeout,
    )
    print(f"like {args.item or repr(_shorten(args.text, 40))}  at {format_iso(result.at)}  model {result.model_version}  "
          f"semantic weight {result.semantic_weight:.3f}", file=out)
    if not result.items:
        print("(no items)", file=out)
        return
    rows = [[rank, i.item_id, _shorten(i.title, 40), i.category, i.score, i.semantic, i.cooccurrence]
            for rank, i in enumerate(result.items, start=1)]
    print(format_table(["rank", "item", "title", "category", "score", "semantic", "cooc"], rows, align="rlllrrr"), file=out)


def cmd_delete_user(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    result = client.delete_user(args.user, timeout=args.timeout)
    print(f"erased user {args.user}: {result.events_deleted} events and {result.impressions_deleted} impressions "
          "deleted (model versions trained before keep what they learned: retrain to drop it)", file=out)


def cmd_feedback(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.file is not None:
        if any(value is not None for value in (args.user, args.item, args.action, args.value, args.at, args.event_id,
                                               args.recommendation_id, args.position)):
            raise UsageError("feedback: give either --file or --user/--item/--action, not both")
        total = FeedbackResult(0, 0)
        for batch in _batches(_read_events(args.file), FEEDBACK_BATCH):
            total += client.feedback(batch, timeout=args.timeout)
        print(f"stored {total.stored}  duplicates {total.duplicates}", file=out)
        return
    missing = [flag for flag, value in (("--user", args.user), ("--item", args.item), ("--action", args.action)) if not value]
    if missing:
        raise UsageError(f"feedback: missing {' '.join(missing)} (or pass --file)")
    event = FeedbackEvent(
        user_id=args.user, item_id=args.item, action=args.action, timestamp=args.at, value=args.value, event_id=args.event_id,
        recommendation_id=args.recommendation_id, position=args.position,
    )
    result = client.feedback([event], timeout=args.timeout)
    print(f"stored {result.stored}  duplicates {result.duplicates}", file=out)


def cmd_import(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    # Imported here: the importers live in the server package, whose dependencies a client-only
    # install lacks.
    try:
        from chronorec.server.core.importers import detect_and_load
    except ImportError as error:
        raise UsageError(f"import reads data sets with the server's code: install chronorec[server] ({error})") from None

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"import: {path} does not exist")
    try:
        items, events = detect_and_load(path)
    except Exception as error:  # the importers' own errors vary by format; all mean "bad input"
        raise UsageError(f"import: cannot load {path}: {error}") from error
    print(f"loaded {len(items)} items and {len(events)} events from {path}", file=out)
    if args.db:
        _import_into_store(args.db, items, events, out)
        return
    progress = _Progress(sys.stderr)

    done = 0
    for batch in _batches(items, IMPORT_ITEM_BATCH):
        result = client.upsert_items(batch, timeout=args.timeout)
        done += len(batch)
        progress.show(f"items {done}/{len(items)}  index size {result.index_size}")
    progress.finish()

    if events:
        batches = list(_batches(events, IMPORT_EVENT_BATCH))
        sent = 0

        def counted() -> Iterator[list[Any]]:
            nonlocal sent
            for batch in batches:
                # Counted when grpc pulls the batch, i.e. as it goes on the wire.
                sent += len(batch)
                progress.show(f"events {min(sent, len(events))}/{len(events)}")
                yield batch

        # The stream's deadline grows with its size: one request deadline per batch.
        timeout = args.timeout * len(batches)
        total = client.feedback_stream(counted(), timeout=timeout)
        progress.finish()
    else:
        total = FeedbackResult(0, 0)
    print(f"imported {len(items)} items; events stored {total.stored}, duplicates {total.duplicates}", file=out)


def _import_into_store(db: str, items: list, events: list, out: TextIO) -> None:
    """Write straight into the event store (no server needed): every replica following a shared
    PostgreSQL store picks the import up from its change log."""
    from chronorec.server.core.errors import ChronorecError
    from chronorec.server.core.stores import open_store, store_target
    from chronorec.server.service.errors import status_for

    try:
        with open_store(store_target(db)) as store:
            stats = store.bulk_import(items, events)
            where = store.location
    except ChronorecError as error:  # said as the server would say it
        raise ChronorecClientError(status_for(error), str(error)) from error
    print(f"imported {stats.items} items into {where}; events stored {stats.events_added}, "
          f"duplicates {stats.events_duplicate}", file=out)


def cmd_status(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    status = client.status(timeout=args.timeout)
    swap = f"in progress -> {status.swap_target}" if status.swap_in_progress else "idle"
    manifest = status.manifest
    print(
        format_pairs(
            [
                ("serving version", status.serving_version or "(none)"),
                ("base model", manifest.get("base_model", "")),
                ("dimension", manifest.get("dimension", "")),
                ("loaded at", format_iso(status.loaded_at) if status.loaded_at else ""),
                ("providers", ", ".join(status.providers)),
                ("index size", status.index_size),
                ("swap", swap),
                ("swaps completed", status.swap_count),
                ("last error", status.last_error or "none"),
            ]
        ),
        file=out,
    )
    print(format_pairs([("resident memory", _mib(status.resident_memory_bytes))]), file=out)
    if status.loaded_versions:
        print(file=out)
        rows = [[v.version, v.role, _mib(v.memory_bytes)] for v in status.loaded_versions]
        print(format_table(["loaded version", "role", "memory (estimated)"], rows, align="llr"), file=out)
    canary = status.canary
    if canary is not None:
        print(file=out)
        rule = (f"promote when its CTR >= current's - {canary.max_ctr_drop:g} after {canary.min_impressions} impressions each"
                if canary.min_impressions else "by hand")
        print(format_pairs([("canary", f"{canary.candidate_version} serves {canary.percent:g}% of users"),
                            ("since", format_iso(canary.started_at) if canary.started_at else ""),
                            ("rule", rule), ("decision", canary.decision)]), file=out)
        rows = [_online_row(label, figures) for label, figures in (("canary", canary.candidate), ("current", canary.current))]
        print(format_table(["since the canary began", "version", "impressions", "clicks", "CTR", "conversions", "MRR"],
                           rows, align="llrrrrr"), file=out)
    if status.last_canary_outcome:
        print(format_pairs([("last canary", status.last_canary_outcome)]), file=out)
    if status.online_metrics:
        print(file=out)
        window = next(iter(status.online_metrics.values())).window_seconds
        rows = [_online_row("", figures)[1:] for _, figures in sorted(status.online_metrics.items())]
        print(format_table([f"online, last {window:g} s", "impressions", "clicks", "CTR", "conversions", "MRR"],
                           rows, align="lrrrrr"), file=out)
        print(format_pairs([("unattributed feedback", status.unattributed_feedback)]), file=out)
    if len(status.replicas) > 1:
        print(file=out)
        rows = [[r.name + (" (answered)" if r.this_replica else ""), r.serving_version or "(loading)", r.applied_seq,
                 f"{r.heartbeat_age_seconds:.1f} s"] for r in status.replicas]
        print(format_table(["replica", "serving version", "applied seq", "heartbeat"], rows, align="llrr"), file=out)
    if status.metrics:
        print(file=out)
        print(format_table(["metric", "value"], sorted(status.metrics.items())), file=out)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _online_row(label: str, figures) -> list[Any]:
    return [label, figures.version, figures.impressions, figures.clicks, figures.ctr, figures.conversions, figures.mrr]


def cmd_versions(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    versions = client.list_versions(timeout=args.timeout)
    if not versions:
        print("(no versions)", file=out)
        return
    rows = [
        [
            ",".join(state for state, on in (("serving", v.serving), ("active", v.active), ("canary", v.canary)) if on),
            v.version,
            v.created_at,
            v.parent_version,
            _online_cell(v.online),
            f"unusable: {v.unusable_reason}" if v.unusable_reason
            else "  ".join(f"{name}={value:.4f}" for name, value in sorted(v.metrics.items())),
        ]
        for v in versions
    ]
    print(format_table(["state", "version", "created", "parent", "online (window)", "offline metrics"], rows), file=out)


def _online_cell(figures) -> str:
    """Online metrics beside the manifest's offline ones (NDCG@10 on its evaluation window)."""
    if figures is None:
        return "-"
    return (f"impressions={figures.impressions} CTR={figures.ctr:.4f} conversions={figures.conversions} "
            f"MRR={figures.mrr:.4f}")


def cmd_activate(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.canary is None and (args.min_impressions or args.max_ctr_drop):
        raise UsageError("activate: --min-impressions and --max-ctr-drop need --canary")
    result = client.activate(args.version, wait=not args.no_wait, canary_percent=args.canary,
                             min_impressions=args.min_impressions, max_ctr_drop=args.max_ctr_drop, timeout=args.timeout)
    if result.canary_version:
        print(f"canary {result.canary_version} serves {result.canary_percent:g}% of users; "
              f"{result.serving_version} serves the rest", file=out)
        return
    print(f"activated {args.version}; serving {result.serving_version}", file=out)


def cmd_canary(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.action == "promote":
        result = client.promote_canary(timeout=args.timeout)
        print(f"promoted: {result.serving_version} serves everyone", file=out)
    elif args.action == "abort":
        result = client.abort_canary(timeout=args.timeout)
        print(f"aborted {result.aborted_version}: {result.serving_version} serves everyone", file=out)
    else:
        status = client.status(timeout=args.timeout)
        if status.canary is None:
            print("no canary is running" + (f" (last: {status.last_canary_outcome})" if status.last_canary_outcome else ""),
                  file=out)
            return
        canary = status.canary
        print(f"canary {canary.candidate_version} serves {canary.percent:g}% of users; decision: {canary.decision}", file=out)
        rows = [_online_row(label, figures) for label, figures in (("canary", canary.candidate), ("current", canary.current))]
        print(format_table(["since it began", "version", "impressions", "clicks", "CTR", "conversions", "MRR"],
                           rows, align="llrrrrr"), file=out)


def cmd_rollback(client: ChronorecClient, args: argparse.Namespace, out: TextIO) -> None:
    result = client.rollback(wait=not args.no_wait, timeout=args.timeout)
    print(f"active {result.active_version}; serving {result.serving_version}", file=out)


# --------------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------------


def _batches(values: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for value in values:
        batch.append(value)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_events(path: str) -> list[dict[str, Any]]:
    """Events of a JSONL file, one JSON object a line; blank lines are skipped."""
    if path != "-" and not Path(path).is_file():
        raise UsageError(f"feedback: {path} is not a file")
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    events = []
    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as error:
                raise UsageError(f"{path}:{number}: not JSON: {error}") from None
            if not isinstance(event, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object")
            events.append(event)
    if not events:
        raise UsageError(f"feedback: {path} holds no events")
    return events


class _Progress:
    """One progress line, redrawn in place on a terminal and printed once per update elsewhere."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._tty = stream.isatty()
        self._dirty = False

    def show(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r" + text + "\033[K")
            self._dirty = True
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._dirty:
            self._stream.write("\n")
            self._stream.flush()
            self._dirty = False


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronorec", description="Talk to a chronorec server over gRPC.")
    parser.add_argument(
        "--target", default=os.environ.get("CHRONOREC_TARGET", DEFAULT_TARGET),
        help="HOST:PORT; replicas as HOST:PORT,HOST:PORT (IP addresses) or one DNS name (dns:///NAME:PORT), "
        "balanced round-robin over the healthy ones (default $CHRONOREC_TARGET or %(default)s)")
    parser.add_argument("--token", help="bearer token (default: $CHRONOREC_TOKEN)")
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM); enables TLS")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    parser.add_argument("--server-name", metavar="NAME", help="expected server name in its certificate")
    parser.add_argument(
        "--timeout", type=_positive_float, metavar="S", help=f"deadline per call in seconds (default {DEFAULT_TIMEOUT:g}; {LONG_TIMEOUT:g} for activate/rollback, per batch for import)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    encode = commands.add_parser("encode", help="encode texts into sentence vectors")
    encode.add_argument("texts", nargs="+", metavar="TEXT")
    encode.set_defaults(run=cmd_encode, default_timeout=DEFAULT_TIMEOUT)

    recommend = commands.add_parser("recommend", help="top-k items for a user")
    recommend.add_argument("user", metavar="USER")
    recommend.add_argument("--k", type=int, default=10)
    recommend.add_argument("--at", metavar="ISO8601", help="as-of time (default: now)")
    recommend.add_argument("--category", action="append", default=[], metavar="C", help="only this category (repeatable)")
    recommend.add_argument("--exclude", action="append", default=[], metavar="ID", help="never return this item (repeatable)")
    recommend.add_argument("--allow-repeats", action="store_true", help="allow items already in the history")
    overrides = recommend.add_argument_group("time-model overrides (default: the serving manifest's values)")
    for name in OVERRIDE_FIELDS:
        kind = int if name == "history_max_events" else _finite_float
        overrides.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, metavar="X")
    recommend.set_defaults(run=cmd_recommend, default_timeout=DEFAULT_TIMEOUT)

    batch = commands.add_parser("recommend-batch", help="top-k items for many users in one call")
    batch.add_argument("users", nargs="+", metavar="USER")
    batch.add_argument("--k", type=int, default=10)
    batch.add_argument("--at", metavar="ISO8601", help="as-of time (default: now)")
    batch.add_argument("--category", action="append", default=[], metavar="C", help="only this category (repeatable)")
    batch.set_defaults(run=cmd_recommend_batch, default_timeout=DEFAULT_TIMEOUT)

    similar = commands.add_parser("similar", help="items most like an item (or a text), as of a time")
    similar.add_argument("item", nargs="?", metavar="ITEM")
    similar.add_argument("--text", help="the text of an item not in the catalog, instead of ITEM")
    similar.add_argument("--k", type=int, default=10)
    similar.add_argument("--at", metavar="ISO8601", help="as-of time for availability (default: now)")
    similar.add_argument("--category", action="append", default=[], metavar="C", help="only this category (repeatable)")
    similar.add_argument("--exclude", action="append", default=[], metavar="ID", help="never return this item (repeatable)")
    similar.add_argument("--semantic-weight", type=_finite_float, metavar="W",
                         help="share of semantic similarity in [0, 1], the rest co-occurrence (default: the model's)")
    similar.set_defaults(run=cmd_similar, default_timeout=DEFAULT_TIMEOUT)

    feedback = commands.add_parser("feedback", help="store feedback events")
    feedback.add_argument("--file", metavar="EVENTS.jsonl", help=f"JSONL events ('-' = stdin), sent in batches of {FEEDBACK_BATCH}")
    feedback.add_argument("--user")
    feedback.add_argument("--item")
    feedback.add_argument("--action", help="view, click, like, purchase, rating, skip, share, add_to_cart, dislike or impression")
    feedback.add_argument("--value", type=_finite_float, help="rating value")
    feedback.add_argument("--at", metavar="ISO8601", help="event time (default: when the server receives it)")
    feedback.add_argument("--event-id", help="idempotency key (default: a random UUID)")
    feedback.add_argument("--recommendation-id", metavar="ID",
                          help="the recommendation this event answers (required for --action impression)")
    feedback.add_argument("--position", type=int, metavar="N",
                          help="1-based rank the item was shown at (required for --action impression)")
    feedback.set_defaults(run=cmd_feedback, default_timeout=DEFAULT_TIMEOUT)

    import_ = commands.add_parser("import", help="import a data set's items and events")
    import_.add_argument("path", metavar="PATH")
    import_.add_argument("--db", metavar="TARGET", help="write into this event store (an SQLite file or a postgresql:// "
                         "URL) directly instead of through the server at --target")
    import_.set_defaults(run=cmd_import, default_timeout=DEFAULT_TIMEOUT)

    status = commands.add_parser("status", help="serving model, providers, index and swap state")
    status.set_defaults(run=cmd_status, default_timeout=DEFAULT_TIMEOUT)

    versions = commands.add_parser("versions", help="model versions in the repository")
    versions.set_defaults(run=cmd_versions, default_timeout=DEFAULT_TIMEOUT)

    activate = commands.add_parser("activate", help="make a version the serving one")
    activate.add_argument("version", metavar="VERSION")
    activate.add_argument("--no-wait", action="store_true", help="return before the hot swap completes")
    activate.add_argument("--canary", type=_finite_float, metavar="PERCENT",
                          help="serve VERSION to this percentage of users beside the current version instead")
    activate.add_argument("--min-impressions", type=int, default=0, metavar="N",
                          help="with --canary: decide automatically once each version logged N impressions")
    activate.add_argument("--max-ctr-drop", type=_finite_float, default=0.0, metavar="X",
                          help="with --min-impressions: promote when canary CTR >= current CTR - X, else abort")
    activate.set_defaults(run=cmd_activate, default_timeout=LONG_TIMEOUT)

    canary = commands.add_parser("canary", help="the canary in progress: status, promote or abort")
    canary.add_argument("action", choices=("status", "promote", "abort"), nargs="?", default="status")
    canary.set_defaults(run=cmd_canary, default_timeout=DEFAULT_TIMEOUT)

    delete_user = commands.add_parser("delete-user", help="erase a user's events everywhere (admin)")
    delete_user.add_argument("user", metavar="USER")
    delete_user.set_defaults(run=cmd_delete_user, default_timeout=DEFAULT_TIMEOUT)

    rollback = commands.add_parser("rollback", help="re-activate the previous version")
    rollback.add_argument("--no-wait", action="store_true", help="return before the hot swap completes")
    rollback.set_defaults(run=cmd_rollback, default_timeout=LONG_TIMEOUT)
    return parser


def _silence(out: TextIO) -> None:
    """Points the process's standard output at /dev/null when `out` is it and its reader has gone,
    so the interpreter's final flush of what is still buffered raises no second BrokenPipeError."""
    if out is not sys.stdout:
        return
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs one command; returns 0 on success, 1 on a gRPC error, 2 on a usage error.

    When the reader of `out` goes away (`chronorec versions | head -1`), the command stops without
    a message and returns 1, as Python's own guidance for SIGPIPE has it."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.timeout is None:
        args.timeout = args.default_timeout
    token = args.token or os.environ.get("CHRONOREC_TOKEN") or None
    try:
        client = ChronorecClient(
            args.target,
            token=token,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            server_name_override=args.server_name,
            timeout=args.timeout,
        )
    except (ValueError, OSError) as error:
        print(f"chronorec: {error}", file=err)
        return EXIT_USAGE
    with client:
        try:
            args.run(client, args, out)
            out.flush()  # a reader gone before the last buffered line is met here, not at exit
        except ChronorecClientError as error:
            print(f"chronorec: {error.code.name}: {error.message}", file=err)
            return EXIT_ERROR
        except BrokenPipeError:
            _silence(out)
            return EXIT_ERROR
        except (UsageError, ValueError, OSError) as error:
            print(f"chronorec: {error}", file=err)
            return EXIT_USAGE
        except ImportError as error:
            print(f"chronorec: {args.command} needs the server package: {error}", file=err)
            return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
