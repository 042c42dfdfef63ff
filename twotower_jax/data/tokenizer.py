"""Byte-level tokenizer: four reserved ids, then one id per byte.

    PAD=0  BOS=1  EOS=2  MASK=3  byte b -> 4 + b   (vocab_size 260)

``MASK_ID == 3`` matches the release's ``mask_token_id`` (SPEC §4.1), so the samplers' defaults
work unchanged on models trained with this tokenizer. ``padded_vocab_size`` (264) rounds the
vocabulary up to a multiple of 8 for models that want it; ids 260..263 are never produced and
decode to nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
MASK_ID = 3
NUM_SPECIAL = 4
VOCAB_SIZE = NUM_SPECIAL + 256
PADDED_VOCAB_SIZE = 264


class ByteTokenizer:
    """UTF-8 bytes shifted past the reserved ids. Stateless; all methods are pure."""

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    mask_id = MASK_ID
    vocab_size = VOCAB_SIZE
    padded_vocab_size = PADDED_VOCAB_SIZE

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """``text`` -> ids: [BOS] + (4 + each UTF-8 byte) + [EOS], the brackets optional."""
        ids = [b + NUM_SPECIAL for b in text.encode("utf-8")]
        if bos:
            ids.insert(0, BOS_ID)
        if eos:
            ids.append(EOS_ID)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """``text`` -> int32 array of byte ids (no BOS/EOS); the fast path for long texts."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + NUM_SPECIAL

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text. Specials (0..3) and the padding ids (260..263) decode to nothing; decoding
        does not stop at EOS (see ``decode_until_eos``); invalid UTF-8 becomes U+FFFD."""
        ids = _checked(ids)
        data = bytes(i - NUM_SPECIAL for i in ids if NUM_SPECIAL <= i < VOCAB_SIZE)
        return data.decode("utf-8", errors="replace")

    def decode_until_eos(self, ids: Iterable[int]) -> str:
        """Like ``decode`` but only the ids before the first EOS."""
        ids = _checked(ids)
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self.decode(ids)


def _checked(ids: Iterable[int]) -> list[int]:
    # A model with a padded vocabulary can emit 260..263; anything else is a caller bug.
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
    bad = [i for i in ids if not 0 <= i < PADDED_VOCAB_SIZE]
    if bad:
        raise ValueError(f"token ids out of range [0, {PADDED_VOCAB_SIZE}): {bad[:5]}")
    return ids
