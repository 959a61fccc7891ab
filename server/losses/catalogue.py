"""Renders the loss catalogue (README) from the descriptions, so the docs cannot drift from the code.

losswire losses --markdown      # prints the catalogue
"""

from __future__ import annotations

from .registry import LOSSES, Registry
from .schema import InputSpec, LossDescription, ParamSpec

START, END = "<!-- catalogue:start -->", "<!-- catalogue:end -->"


def _param(spec: ParamSpec) -> str:
    kind = spec.type + (" or None" if spec.nullable else "")  # no "|": it would split the table cell
    if spec.choices:
        kind = " / ".join(repr(c) for c in spec.choices)
    return f"`{spec.name}`: {kind} = `{spec.default!r}`"


def _input(spec: InputSpec) -> str:
    return f"`{spec.name}`" + ("?" if spec.optional else "")


def render_loss(description: LossDescription) -> str:
    output = description.output.value
    if description.output_variants:
        output += " (" + "; ".join(f"{v.value} if {k}" for k, v in description.output_variants.items()) + ")"
    return (
        f"| **{description.name}** | {description.summary} | "
        + "<br>".join(_param(p) for p in description.params)
        + " | "
        + ", ".join(_input(i) for i in description.inputs)
        + f" | {output} | "
        + ", ".join(f"`{d}`" for d in description.differentiable)
        + " |"
    )


def render_markdown(registry: Registry = LOSSES) -> str:
    lines = [
        START,
        "| Loss | What it computes | Config parameters (type = default) | Forward inputs, in order (? = optional) "
        "| Output for `reduction='none'` | Gradients |",
        "|---|---|---|---|---|---|",
        *(render_loss(d) for d in registry.descriptions()),
        END,
    ]
    return "\n".join(lines)
