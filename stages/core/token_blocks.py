"""The tokenized blocks that ``tokenize`` commits (``dataset/``, a ``datasets`` DatasetDict) read back as arrays.

train_lora trains on the train split; drift counts its tokens. task=causal_lm writes ``input_ids`` alone
(every token is a label); task=sft adds ``labels`` (-100 where no loss) and ``position_ids`` (restarting
per packed example).
"""

from __future__ import annotations

import numpy as np

from stages.core import downloads, layout, uris
from stages.core.errors import UserError

BLOCK_COLUMNS = ("input_ids", "labels", "position_ids")


def load_blocks(dataset_uri: str, field: str = "dataset_uri") -> dict[str, np.ndarray]:
    """The train split's columns, each a (blocks, block_size) int64 array."""
    import datasets

    with downloads.local_copy(uris.join(dataset_uri, layout.DATASET)) as path:
        try:
            train = datasets.load_from_disk(str(path))["train"]
        except (FileNotFoundError, KeyError) as exc:
            raise UserError(f"{field}={dataset_uri!r} holds no tokenized train split: {exc}") from None
        columns = [c for c in BLOCK_COLUMNS if c in train.column_names]
        # [:] reads the columns as arrays; indexing a column alone iterates it row by row in Python
        table = train.with_format("numpy", columns=columns)[:]
        blocks = {c: np.asarray(table[c], dtype=np.int64) for c in columns}
    if "input_ids" not in blocks or blocks["input_ids"].ndim != 2 or len(blocks["input_ids"]) == 0:
        raise UserError(f"{field}={dataset_uri!r} has no training blocks")
    return blocks
