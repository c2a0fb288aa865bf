"""Two tasks over variable-length token sequences, batched by length.

Token rows (ids 1..VOCAB-1) with long-tailed lengths (lognormal, median ~20, at most 256),
as weak supervision over sentences and documents gives. Two tasks read the same rows:
``keyword`` (does a row hold a token of a small keyword set?) and ``topic`` (are most of
its tokens from the upper half of the vocabulary?). They share one encoder, embedding ->
Dense -> ReLU -> max over the real positions (the loader's ``tokens_mask`` hides the
padding), and each has a head of its own.

The loaders cut every batch to a bucket length (README "Text and variable-length
inputs"); ``bucket_by_length=True`` also batches rows of similar length together, so a
batch pays for its own rows, not for the longest row of the data set. On a CPU one
compiled train program serves every bucket.

Run: python examples/text_classification.py   (prints test accuracies)
Import: ``main(n_epochs=..., seed=...)`` returns ``(scores, trainer)``.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxmtl

VOCAB, EMBED, HIDDEN = 2000, 32, 64
KEYWORDS = np.arange(1, 21)  # the keyword task's tokens


def make_rows(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """``n`` token rows and the two tasks' labels (about half of each class)."""
    lengths = np.clip(np.round(rng.lognormal(np.log(20), 0.8, n)), 2, 256).astype(int)
    rows = []
    for length in lengths:
        upper = rng.random() < 0.5  # the row's topic: mostly upper- or lower-half ids
        low, high = (VOCAB // 2, VOCAB) if upper else (21, VOCAB // 2)
        row = np.where(rng.random(length) < 0.8, rng.integers(low, high, length),
                       rng.integers(21, VOCAB, length))
        if rng.random() < 0.5:  # half of the rows get a keyword somewhere
            row[rng.integers(length)] = rng.choice(KEYWORDS)
        rows.append(row.astype(np.int32))
    labels = {"keyword": np.array([int(np.isin(r, KEYWORDS).any()) for r in rows]),
              "topic": np.array([int((r >= VOCAB // 2).mean() > 0.5) for r in rows])}
    return rows, labels


class MaskedMaxEncoder(nn.Module):
    """Embedding -> Dense -> ReLU, then the max over the row's real positions."""

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(HIDDEN)(nn.Embed(VOCAB, EMBED)(tokens)))
        return jnp.max(jnp.where(mask[..., None], h, -1e9), axis=1)


def make_model(seed: int) -> jaxmtl.MultitaskClassifier:
    """The two tasks over one shared encoder."""
    modules = {"encoder": MaskedMaxEncoder(), "keyword_head": nn.Dense(2),
               "topic_head": nn.Dense(2)}
    tasks = [jaxmtl.Task(name, modules, [
        jaxmtl.Operation("encoder", [("_input_", "tokens"), ("_input_", "tokens_mask")]),
        jaxmtl.Operation(f"{name}_head", ["encoder"])]) for name in ("keyword", "topic")]
    return jaxmtl.MultitaskClassifier(tasks, seed=seed)


def main(n_epochs: int = 3, seed: int = 0, n_rows: int = 4000
         ) -> tuple[dict[str, float], jaxmtl.Trainer]:
    """Trains both tasks (validating each epoch) and scores the test split."""
    rng = np.random.default_rng(seed)
    loaders = {}
    for split, n in (("train", n_rows), ("valid", n_rows // 4), ("test", n_rows // 4)):
        rows, labels = make_rows(n, rng)
        dataset = jaxmtl.DictDataset("text", split, {"tokens": rows}, labels)
        loaders[split] = jaxmtl.DictDataLoader(dataset, batch_size=32,
                                               shuffle=split == "train", seed=seed,
                                               bucket_by_length=True)
    model = make_model(seed)
    trainer = jaxmtl.Trainer(n_epochs=n_epochs, lr=3e-3, seed=seed, progress_bar=False,
                             log_manager_config={"evaluation_freq": 1})
    trainer.fit(model, [loaders["train"], loaders["valid"]])
    return model.score([loaders["test"]]), trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scores, trainer = main(args.epochs, args.seed)
    for key in ("keyword/text/test/accuracy", "topic/text/test/accuracy"):
        print(f"{key}: {scores[key]:.3f}")
    print(f"compiled train programs: {trainer.compiled_programs()}")
