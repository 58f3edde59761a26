#!/usr/bin/env python3
"""Stands in for Claude Code's own telemetry (stdlib only): reads the prompt on stdin, exports the events
Claude Code exports (user_prompt, api_request, tool_decision, tool_result) as OTLP/HTTP JSON to
$OTEL_EXPORTER_OTLP_ENDPOINT, the way CLAUDE_CODE_ENABLE_TELEMETRY=1 makes it, and prints its answer.
It never talks to a model; honouring OTEL_LOG_USER_PROMPTS is the only policy it applies, as Claude does.
"""

import json
import os
import sys
import time
import urllib.request


def value(item: object) -> dict[str, object]:
    if isinstance(item, bool):
        return {"boolValue": item}
    if isinstance(item, int):
        return {"intValue": str(item)}
    if isinstance(item, float):
        return {"doubleValue": item}
    return {"stringValue": str(item)}


def record(name: str, at: int, **attributes: object) -> dict[str, object]:
    fields = {"event.name": name, "session.id": "fake-session-1", **attributes}
    return {
        "timeUnixNano": str(at),
        "body": {"stringValue": f"claude_code.{name}"},
        "attributes": [{"key": key, "value": value(item)} for key, item in fields.items()],
    }


def main() -> int:
    prompt = sys.stdin.read().strip()
    now = time.time_ns()
    prompt_fields: dict[str, object] = {"prompt_length": len(prompt)}
    if os.environ.get("OTEL_LOG_USER_PROMPTS") == "1":
        prompt_fields["prompt"] = prompt
    records = [
        record("user_prompt", now, **prompt_fields),
        record(
            "api_request",
            now + 1_000_000,
            model="claude-fake-1",
            cost_usd=0.0123,
            duration_ms=2100,
            input_tokens=1200,
            output_tokens=340,
            cache_read_tokens=0,
            cache_creation_tokens=0,
        ),
        record("tool_decision", now + 2_000_000, tool_name="Bash", decision="accept", source="config"),
        record("tool_result", now + 3_000_000, tool_name="Bash", success=True, duration_ms=120),
    ]
    request = {
        "resourceLogs": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "claude-code"}}]},
                "scopeLogs": [{"scope": {"name": "com.anthropic.claude_code.events"}, "logRecords": records}],
            }
        ]
    }
    endpoint = os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/")
    sent = urllib.request.Request(
        f"{endpoint}/v1/logs", data=json.dumps(request).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(sent, timeout=10) as response:
        if response.status != 200:
            print(f"export failed: {response.status}", file=sys.stderr)
            return 1
    print(f"done: {prompt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
