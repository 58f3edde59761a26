"""Telemetry events as an operator reads them: one line each, oldest first, then what it all cost.

Times are UTC, as in `--json`; a `── YYYY-MM-DD UTC ──` line starts each day, so a clock time is never
ambiguous. A field an event lacks is shown as `?` (or left out where it is optional), never an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from controller.telemetry.events import TelemetryEvent

Fields = Mapping[str, Any]
PROMPT_PREVIEW_CHARS: Final = 80
ERROR_PREVIEW_CHARS: Final = 80
OTHER_PREVIEW_CHARS: Final = 120
TYPE_COLUMN: Final = 14  # len("tls_unobserved"), the longest known type
# What Claude Code sends as the prompt unless OTEL_LOG_USER_PROMPTS=1.
REDACTED_PROMPT: Final = "<REDACTED>"


@dataclass(frozen=True)
class Totals:
    """What the agent spent, and how many events of each type there were."""

    cost_usd: float
    cost_source: str  # "api_request", "agent_run", or "" when nothing reported a cost
    input_tokens: int
    output_tokens: int
    counts: Mapping[str, int]


def render_timeline(shown: Sequence[TelemetryEvent], everything: Sequence[TelemetryEvent]) -> list[str]:
    """Lines for `shown`, then a footer whose totals cover `everything` (the filters only narrow the lines)."""
    return [*timeline_lines(shown), *footer_lines(totals(everything), shown=len(shown))]


def timeline_lines(events: Sequence[TelemetryEvent]) -> list[str]:
    lines: list[str] = []
    day = None
    for event in events:
        moment = event.time
        if moment.date() != day:
            day = moment.date()
            lines.append(f"── {day.isoformat()} UTC ──")
        clock = f"{moment:%H:%M:%S}.{moment.microsecond // 1000:03d}"
        lines.append(f"{clock}  {event.type:<{TYPE_COLUMN}} {summary(event)}".rstrip())
    return lines


def summary(event: TelemetryEvent) -> str:
    """The type-specific, readable part of an event's line."""
    return _SUMMARIES.get(event.type, _other)(event.fields)


def totals(events: Sequence[TelemetryEvent]) -> Totals:
    """API spend from Claude Code's api_request events; agent runs' own reports only when there are none.

    Both describe the same spending, so adding them up would count it twice.
    """
    counts = Counter(event.type for event in events)
    for source in ("api_request", "agent_run"):
        reporting = [event.fields for event in events if event.type == source]
        if reporting:
            return Totals(
                cost_usd=sum(_number(fields.get("cost_usd")) or 0.0 for fields in reporting),
                cost_source=source,
                input_tokens=int(sum(_number(fields.get("input_tokens")) or 0 for fields in reporting)),
                output_tokens=int(sum(_number(fields.get("output_tokens")) or 0 for fields in reporting)),
                counts=dict(counts),
            )
    return Totals(0.0, "", 0, 0, dict(counts))


def footer_lines(found: Totals, *, shown: int) -> list[str]:
    total = sum(found.counts.values())
    sources = {"api_request": "from API requests", "agent_run": "as agent runs reported", "": "nothing reported a cost"}
    lines = [
        "--",
        f"API cost {_dollars(found.cost_usd)} ({sources[found.cost_source]}), "
        f"tokens in {found.input_tokens} / out {found.output_tokens}",
        f"{total} {_plural(total, 'event')}: " + ", ".join(f"{kind} {found.counts[kind]}" for kind in sorted(found.counts)),
    ]
    if shown != total:
        lines.append(f"showing {shown} of {total}")
    return lines


# ---- one summary per event type ---------------------------------------------------------------


def _dns(fields: Fields) -> str:
    answer = ", ".join(str(address) for address in fields.get("addresses") or [])
    detail = answer or (str(fields["rcode"]) if fields.get("rcode") not in (None, "") else "")
    line = f"{_text(fields, 'host')} {_text(fields, 'qtype')} → {_decision(fields)}"
    return f"{line} ({detail})" if detail else line


def _gate(fields: Fields) -> str:
    return f"{_decision(fields)} {_text(fields, 'protocol')} {_endpoint(fields, with_address=True)}{_by(fields)}"


def _tls(fields: Fields) -> str:
    direction = _text(fields, "direction")
    arrow = "←" if direction == "read" else "→"
    parts = [f"{direction} {_text(fields, 'bytes')} B {arrow} {_endpoint(fields, with_address=False)}", _process(fields)]
    parts += [str(fields[key]) for key in ("http.method", "http.path", "http.status") if _present(fields, key)]
    return " ".join(part for part in parts if part)


def _tls_unobserved(fields: Fields) -> str:
    exe = f" {fields['exe']}" if _present(fields, "exe") else ""
    return f"{_process(fields) or '?'}{exe}: {_text(fields, 'reason')}"


def _agent_run(fields: Fields) -> str:
    parts = [_text(fields, "agent"), _text(fields, "status")]
    if _present(fields, "exit_code"):
        parts.append(f"exit {fields['exit_code']}")
    cost = _number(fields.get("cost_usd"))
    if cost is not None:
        parts.append(_dollars(cost))
    seconds = _number(fields.get("duration_s"))
    if seconds is not None:
        parts.append(f"({seconds:.1f} s)")
    return " ".join(parts)


def _user_prompt(fields: Fields) -> str:
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt or prompt == REDACTED_PROMPT:
        length = fields.get("prompt_length")
        return f"(prompt not logged, {length} chars)" if length is not None else "(prompt not logged)"
    return f'"{_preview(prompt, PROMPT_PREVIEW_CHARS)}"'


def _api_request(fields: Fields) -> str:
    cost = _number(fields.get("cost_usd"))
    parts = [
        _text(fields, "model"),
        _dollars(cost) if cost is not None else "$?",
        f"in={_text(fields, 'input_tokens')}",
        f"out={_text(fields, 'output_tokens')}",
    ]
    return " ".join(parts) + _took(fields)


def _api_error(fields: Fields) -> str:
    parts = [_text(fields, "model")]
    if _present(fields, "status_code"):
        parts.append(str(fields["status_code"]))
    parts.append(_preview(str(fields.get("error") or "?"), ERROR_PREVIEW_CHARS))
    return " ".join(parts) + _took(fields)


def _tool_decision(fields: Fields) -> str:
    source = f" ({fields['source']})" if _present(fields, "source") else ""
    return f"{_text(fields, 'tool_name')} {_text(fields, 'decision')}{source}"


def _tool_result(fields: Fields) -> str:
    success = fields.get("success")
    outcome = "ok" if success is True else "FAILED" if success is False else "?"
    line = f"{_text(fields, 'tool_name')} {outcome}"
    milliseconds = _number(fields.get("duration_ms"))
    if milliseconds is not None:
        line += f" {_milliseconds(milliseconds)}"
    if _present(fields, "error"):
        line += f": {_preview(str(fields['error']), ERROR_PREVIEW_CHARS)}"
    return line


def _other(fields: Fields) -> str:
    """An event km has no summary for: its fields as key=value, so nothing recorded is hidden."""
    return _preview(" ".join(f"{key}={value}" for key, value in fields.items()), OTHER_PREVIEW_CHARS)


_SUMMARIES: Final[dict[str, Callable[[Fields], str]]] = {
    "dns": _dns,
    "gate": _gate,
    "tls": _tls,
    "tls_unobserved": _tls_unobserved,
    "agent_run": _agent_run,
    "user_prompt": _user_prompt,
    "api_request": _api_request,
    "api_error": _api_error,
    "tool_decision": _tool_decision,
    "tool_result": _tool_result,
}


# ---- pieces ---------------------------------------------------------------------------------------


def _present(fields: Fields, key: str) -> bool:
    return fields.get(key) not in (None, "")


def _text(fields: Fields, key: str) -> str:
    return str(fields[key]) if _present(fields, key) else "?"


def _decision(fields: Fields) -> str:
    """Denials in capitals so they stand out in a long timeline."""
    decision = _text(fields, "decision")
    return {"denied": "DENIED", "would_deny": "WOULD DENY"}.get(decision, decision)


def _endpoint(fields: Fields, *, with_address: bool) -> str:
    """`host:port`, the name when known; `with_address` adds the address too, as a name can resolve to several."""
    address = fields.get("address")
    host = fields.get("host") or address or "?"
    port = f":{fields['port']}" if _present(fields, "port") else ""
    return f"{host}{port} ({address})" if with_address and address and address != host else f"{host}{port}"


def _process(fields: Fields) -> str:
    """`curl[1234]`, or whichever half is known."""
    name = str(fields.get("process") or "")
    return f"{name}[{fields['pid']}]" if _present(fields, "pid") else name


def _by(fields: Fields) -> str:
    process = _process(fields)
    return f" by {process}" if process else ""


def _took(fields: Fields) -> str:
    milliseconds = _number(fields.get("duration_ms"))
    return f" ({_milliseconds(milliseconds)})" if milliseconds is not None else ""


def _milliseconds(value: float) -> str:
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def _dollars(value: float) -> str:
    """Cents always, and up to four decimals when a small amount needs them: $0.05, $0.0123, $1.50."""
    text = f"{value:.4f}"
    while text.endswith("0") and len(text.split(".")[1]) > 2:
        text = text[:-1]
    return f"${text}"


def _preview(text: str, limit: int) -> str:
    """One line (newlines and runs of spaces collapsed), cut to `limit` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"
