"""Where a dispatcher's decision log keeps the outcomes reported to it: beside the log, one file per
reporting tenant, so that one tenant's reports (any key may report, for ids it cannot check) rotate only
its own file, never the request lines or another tenant's reports.

`decisions.jsonl` keeps its outcome lines in `decisions.outcomes.<tenant>.jsonl` (and that file's rotated
backups, `...jsonl.1`, ...). The dispatcher writes them (serving.dispatch.decision_log); training reads
them with the log they belong to (training.data), wherever the log was named from.
"""

from __future__ import annotations

import glob
from pathlib import Path

OUTCOMES_INFIX = ".outcomes."


def outcome_log_path(log: Path, tenant: str) -> Path:
    """The file `log` keeps `tenant`'s reported outcomes in."""
    return log.with_name(f"{log.stem}{OUTCOMES_INFIX}{tenant}{log.suffix}")


def outcome_logs_beside(log: Path) -> list[Path]:
    """The outcome files (and their backups) of the decision log `log`, itself a log or one of its
    rotated backups (`decisions.jsonl.3`); none for a file that is an outcome file already."""
    # Imported here: the dispatcher, which only writes these files, need not load pyarrow with the reader.
    from classifier.prompt_files import is_rotated_jsonl

    name = log.name.rsplit(".", 1)[0] if is_rotated_jsonl(log) else log.name
    base = Path(name)
    if OUTCOMES_INFIX in name or not base.suffix:
        return []
    # Escaped: a log named `decisions[1].jsonl` would otherwise glob for `decisions1...` and find nothing.
    pattern = f"{glob.escape(base.stem)}{OUTCOMES_INFIX}*{base.suffix}"
    return sorted(path for path in log.parent.glob(pattern + "*") if path.is_file()
                  and (path.name.endswith(base.suffix) or is_rotated_jsonl(path)))
