"""`python -m clients "To be, or not" --max-tokens 64 --stream`: generate from a TZD server in a terminal.

--stream shows the canvas denoising live (on stderr: masked positions dimmed, the tokens each step
committed highlighted, a step counter); the final text goes to stdout. --json prints machine-readable
output instead: one JSON line per event with --stream ({"event": "step"|"done"|"error", "data": ...}).
Exit status: 0 done, 1 server or connection error, 2 bad request or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from clients.client import DEFAULT_BASE_URL, Completion, StepEvent, TZDClient
from clients.errors import APIError, BadRequest
from clients.protocol import MASK_PLACEHOLDER, SamplingParams

NEW_STYLE = "bold black on bright_green"  # tokens committed by the latest step
MASK_STYLE = "dim"
PROMPT_STYLE = "bold cyan"


def _bool(text: str) -> bool:
    """A boolean flag's value: true/false (also 1/0, yes/no, on/off)."""
    value = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
             "off": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _field_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) for a SamplingParams field annotation."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return str, [str(a) for a in get_args(annotation)]
    if annotation is bool:
        return _bool, None
    return (annotation if annotation in (int, float) else str), None


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags; the sampling flags are generated from SamplingParams (same names, dashes for _)."""
    p = argparse.ArgumentParser(prog="python -m clients", description="Generate text with a TZD server.")
    p.add_argument("prompt", nargs="?", help="the prompt ('-' reads it from stdin)")
    p.add_argument("--suffix", default=None, metavar="TEXT",
                   help="text after the generated canvas: fill max_tokens positions between prompt and it")
    p.add_argument("--logprobs", action="store_true", help="return each token's log-probability (with --json)")
    p.add_argument("--stream", action="store_true", help="show the canvas denoising step by step")
    p.add_argument("--json", action="store_true", help="print JSON (one line per event with --stream)")
    p.add_argument("--health", action="store_true", help="print the server's health and exit")
    p.add_argument("--models", action="store_true", help="list the served models and exit")
    conn = p.add_argument_group("connection")
    conn.add_argument("--url", default=None, help=f"server URL [env TZD_BASE_URL; default {DEFAULT_BASE_URL}]")
    conn.add_argument("--api-key", default=None, help="API key [env TZD_API_KEY]")
    conn.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer [300]")
    conn.add_argument("--retries", type=int, default=2, help="retries on 429/503 and refused connections [2]")
    sp = p.add_argument_group("sampling (SamplingParams; left out = the server's default)")
    for name, field in SamplingParams.model_fields.items():
        kind, choices = _field_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        if name == "stop":
            sp.add_argument(flag, action="append", default=argparse.SUPPRESS, metavar="TEXT",
                            help="stop string (repeatable)")
            continue
        metavar = {int: "N", float: "X", _bool: "true|false"}.get(kind) if choices is None else None
        sp.add_argument(flag, dest=name, type=kind, choices=choices, default=argparse.SUPPRESS, metavar=metavar,
                        help=field.description)
    return p


class CanvasView:
    """The generated canvas as a rich renderable: committed tokens, masked positions, the latest step's tokens."""

    def __init__(self, prompt: str, max_tokens: int) -> None:
        self.prompt = prompt
        self.tokens: list[str | None] = [None] * max_tokens
        self.new: set[int] = set()
        self.event: StepEvent | None = None

    def update(self, event: StepEvent) -> None:
        """Apply one step event."""
        self.event = event
        self.new = {c.position for c in event.committed}
        for c in event.committed:
            if c.position >= len(self.tokens):
                self.tokens.extend([None] * (c.position + 1 - len(self.tokens)))
            self.tokens[c.position] = c.text

    def header(self) -> Text:
        """The step counter."""
        ev = self.event
        if ev is None:
            return Text("waiting for the first step...", style="dim")
        done = len(self.tokens) - ev.masked
        return Text.assemble(("step ", "bold"), (f"{ev.step + 1}/{ev.steps}", "bold yellow"),
                             f"  {done} committed  {ev.masked} masked", style="")

    def canvas(self) -> Text:
        """Prompt, then each position: its token (highlighted if new) or the mask placeholder (dimmed)."""
        text = Text()
        text.append(self.prompt, style=PROMPT_STYLE)
        for i, tok in enumerate(self.tokens):
            if tok is None:
                text.append(MASK_PLACEHOLDER, style=MASK_STYLE)
            elif i in self.new:
                shown = tok.replace("\n", "\u21b5\n") if tok.isspace() else tok  # a new newline stays visible
                text.append(shown, style=NEW_STYLE)
            else:
                text.append(tok)
        return text

    def __rich__(self) -> Group:
        return Group(self.header(), self.canvas())


def summary(done: Completion) -> str:
    """One line about a finished generation."""
    return (f"{done.usage.completion_tokens} tokens, {done.steps} steps, {done.nfe} forward passes, "
            f"finish_reason={done.finish_reason}, {done.timings.total:.2f} s")


def _emit(event: str, data: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "data": data}) + "\n")
    sys.stdout.flush()


def run_stream(client: TZDClient, prompt: str, params: dict[str, Any], as_json: bool) -> Completion:
    """Stream one generation: JSON lines, or the live canvas on stderr; returns the Completion."""
    events = client.stream(prompt, **params)  # checks the parameters before the view starts
    if as_json:
        for ev in events:
            _emit("step" if isinstance(ev, StepEvent) else "done", ev.model_dump(mode="json"))
            if isinstance(ev, Completion):
                return ev
        raise AssertionError("a stream ends in its Completion or raises")
    err = Console(stderr=True, highlight=False)
    view = CanvasView(prompt, params.get("max_tokens", SamplingParams.model_fields["max_tokens"].default))
    done: Completion | None = None
    with Live(view, console=err, auto_refresh=False, transient=True) as live:
        for ev in events:
            if isinstance(ev, Completion):
                done = ev
                break
            view.update(ev)
            live.refresh()
    assert done is not None, "a stream ends in its Completion or raises"
    err.print(view.header(), Text(f"  done: {summary(done)}", style="dim"), sep="", soft_wrap=True)
    return done


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    params = {name: getattr(args, name) for name in SamplingParams.model_fields if hasattr(args, name)}
    params.update({k: v for k, v in (("suffix", args.suffix), ("logprobs", args.logprobs or None)) if v is not None})
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if prompt is None and not (args.health or args.models):
        parser.error("a prompt is required (or --health / --models)")
    try:
        with TZDClient(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=args.retries) as client:
            if args.health:
                h = client.health()
                print(h.model_dump_json() if args.json else f"{h.status} (model {h.model})")
                return 0 if h.status == "ok" else 1
            if args.models:
                cards = client.models()
                for card in cards:
                    print(card.model_dump_json() if args.json else card.id)
                return 0
            assert prompt is not None
            if args.stream:
                done = run_stream(client, prompt, params, args.json)
                if not args.json:
                    print(done.text)
                return 0
            done = client.generate(prompt, **params)
            print(done.model_dump_json() if args.json else done.text)
            return 0
    except APIError as e:
        if args.json:
            _emit("error", {"error": {"message": e.message, "type": e.type or type(e).__name__,
                                      "param": e.param, "code": e.code, "status": e.status}})
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if isinstance(e, BadRequest) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
