"""Which file a server given --model-repository REPO --model-name NAME serves: REPO/NAME/N/model.onnx.

The layout is export's (export/repository.py writes it): numbered folders, each holding model.onnx, made
whole by a rename; names that are not numbers (.retired, a folder being published) are not versions. The
highest version serves unless --model-version pins one. The watcher (serve/ops/reload.py) asks again at
every check, so a new version, or a rollback that retired the highest, is seen within one interval.
"""

from __future__ import annotations

import os

MODEL = "model.onnx"


def locate(repository: str, name: str, pinned: int = 0) -> tuple[str, str]:
    """(path, version) of the file to serve; FileNotFoundError naming the folder when there is none."""
    folder = os.path.join(repository, name)
    if pinned:
        path = os.path.join(folder, str(pinned), MODEL)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: version {pinned} (--model-version) is not in the repository")
        return path, str(pinned)
    try:
        names = os.listdir(folder)
    except OSError as error:
        raise FileNotFoundError(f"{folder}: no model repository folder ({error.strerror or error})") from None
    numbers = sorted((int(n) for n in names if n.isascii() and n.isdecimal()
                      and os.path.isfile(os.path.join(folder, n, MODEL))), reverse=True)
    if not numbers:
        raise FileNotFoundError(f"{folder}: no version yet (python -m export RUN --repository {repository} "
                                f"--name {name} publishes one)")
    return os.path.join(folder, str(numbers[0]), MODEL), str(numbers[0])
