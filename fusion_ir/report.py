"""The fusion report: one entry per candidate, fused or skipped with the reason."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

FUSED = "fused"
SKIPPED = "skipped"


@dataclass
class Candidate:
    pattern: str
    anchor: str
    nodes: list[str]
    status: str
    reason: str | None = None


@dataclass
class Report:
    """Candidates keyed by their anchor node (the BN, Mul or Add a fold would remove).

    The pass manager runs passes until nothing changes, so a candidate skipped in one round can fold
    in a later one; the last verdict for an anchor is the one kept.
    """

    candidates: dict[str, Candidate] = field(default_factory=dict)
    verification: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def fused(self, pattern: str, anchor: str, nodes: list[str]) -> None:
        self.candidates[anchor] = Candidate(pattern, anchor, nodes, FUSED)

    def skipped(self, pattern: str, anchor: str, nodes: list[str], reason: str) -> None:
        previous = self.candidates.get(anchor)
        if previous is not None and previous.status == FUSED:
            return
        self.candidates[anchor] = Candidate(pattern, anchor, nodes, SKIPPED, reason)

    @property
    def num_fused(self) -> int:
        return sum(c.status == FUSED for c in self.candidates.values())

    @property
    def num_skipped(self) -> int:
        return sum(c.status == SKIPPED for c in self.candidates.values())

    def to_dict(self) -> dict:
        return {
            "candidates": [asdict(c) for c in self.candidates.values()],
            "summary": {"fused": self.num_fused, "skipped": self.num_skipped},
            "verification": self.verification,
            "warnings": self.warnings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary_table(self) -> str:
        """Return a short table: per pattern, candidates found, fused and skipped; then skip reasons."""
        rows: dict[str, list[int]] = {}
        for c in self.candidates.values():
            row = rows.setdefault(c.pattern, [0, 0, 0])
            row[0] += 1
            row[1 if c.status == FUSED else 2] += 1
        if not rows:
            return "no fusion candidates found"
        width = max(len("pattern"), *(len(p) for p in rows))
        lines = [f"{'pattern':<{width}}  found  fused  skipped"]
        for pattern in sorted(rows):
            found, fused, skipped = rows[pattern]
            lines.append(f"{pattern:<{width}}  {found:>5}  {fused:>5}  {skipped:>7}")
        skips = [c for c in self.candidates.values() if c.status == SKIPPED]
        if skips:
            lines.append("skipped:")
            lines.extend(f"  {c.anchor}: {c.reason}" for c in skips)
        return "\n".join(lines)

    def details_table(self) -> str:
        """Return one line per candidate: status, pattern, anchor node and, when skipped, the reason."""
        if not self.candidates:
            return "no fusion candidates found"
        width = max(len(c.pattern) for c in self.candidates.values())
        lines = []
        for c in self.candidates.values():
            verdict = "fold" if c.status == FUSED else "skip"
            line = f"{verdict}  {c.pattern:<{width}}  {c.anchor}"
            lines.append(line + (f": {c.reason}" if c.reason else ""))
        lines.append(f"{self.num_fused} would fold, {self.num_skipped} would not")
        return "\n".join(lines)
