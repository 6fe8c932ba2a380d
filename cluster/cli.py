"""The ``kvmesh`` command line."""

from __future__ import annotations

import argparse
import sys


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory or .gguf file (default: embedded SmolLM2)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")


def _params(args: argparse.Namespace):
    from kvmesh import SamplingParams

    return SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvmesh import LLM

    llm = LLM(args.model)
    out = llm.generate(args.prompt, _params(args))[0]
    print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kvmesh import LLM

    llm = LLM(args.model)
    params = _params(args)
    if args.message is not None:
        print(llm.chat([{"role": "user", "content": args.message}], params)[0].outputs[0].text)
        return 0
    history: list[dict[str, str]] = []
    print("kvmesh chat — empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = llm.chat(history, params)[0].outputs[0].text
        history.append({"role": "assistant", "content": reply})
        print(reply)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmesh",
        description=(
            "kvmesh: an LLM serving cluster on Ray Serve. Run a model offline "
            "(generate, chat) or serve it over an OpenAI-compatible HTTP API."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("generate", help="complete a raw prompt and print the completion")
    p.add_argument("prompt", help="the text to continue")
    _add_engine_options(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="answer one message (or chat interactively without one)")
    p.add_argument("message", nargs="?", default=None, help="the user message")
    _add_engine_options(p)
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"kvmesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
