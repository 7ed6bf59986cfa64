"""``python -m backbones``: the zoo as a table (name, parameters, GMACs at the native size, stages)."""

from __future__ import annotations

import argparse
import json

from . import BACKBONES
from .complexity import profile


def zoo_table(names: list[str] | None = None) -> list[dict]:
    rows = []
    for name in names or list(BACKBONES):
        info = profile(BACKBONES[name])
        rows.append({"name": name, **info})
    return rows


def _stages(stages: dict) -> str:
    return " ".join(f"{name}:{ch}/{stride}" for name, (ch, stride) in stages.items())


def format_table(rows: list[dict], markdown: bool = False) -> str:
    header = ["name", "params (M)", "GMACs", "input", "stages (channels/stride)"]
    body = [
        [r["name"], f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.2f}", f"{r['input_size']}²", _stages(r["stages"])]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 4) else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in body])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backbones", description=__doc__)
    parser.add_argument("names", nargs="*", help="zoo names (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", action="store_true", help="print one JSON object per backbone")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in BACKBONES:
            parser.error(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    rows = zoo_table(args.names)
    if args.json:
        print("\n".join(json.dumps(r) for r in rows))
    else:
        print(format_table(rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
