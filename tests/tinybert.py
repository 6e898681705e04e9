"""Builds a seeded random tiny BERT folder (model + tokenizer) so export and encoder tests run in seconds."""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Words the tests' history texts and item texts are made of; anything else tokenizes to
# word pieces of single letters or [UNK], which is fine for a random model.
TOPIC_WORDS = """
cooking astronomy football jazz programming gardening finance travel music movies books
science history art poetry chess tennis running cycling baking coffee tea wine beer
python rust java database network cloud server model data learning recipe soup bread
pasta pizza salad garden flowers trees stars planets galaxy telescope moon sun mars
stocks bonds market money bank budget trip flight hotel beach mountain city museum
guitar piano drums saxophone band concert album song dance film drama comedy action
animation children thriller horror romance documentary western musical war crime
mystery fantasy adventure story toy
""".split()

TIME_AND_ACTION_WORDS = """
days day ago rated rating viewed view clicked click liked like purchased purchase
shared share skipped skip disliked dislike added cart to yesterday today week weeks
month months year years hour hours minute minutes second seconds just now a an the
and or of in on at for with by from is was it this that new old best top good great
""".split()

FILLER_WORDS = """
about above after again against all am are as be because been before being below
between both but can could did do does doing down during each few further had has
have having he her here hers him his how i if into its me more most my no nor not
off once only other our out over own same she should so some such than their them
then there these they those through too under until up very we were what when where
which while who whom why will would you your one two three four five six seven eight
nine ten first last next long short big small high low hot cold red blue green black
white light dark fast slow early late open close free home work play game team match
goal score win lose fan club league cup season player coach ball field kick pass run
""".split()

PUNCTUATION = list("|;:,.()'!?-&/")
DIGITS = [str(d) for d in range(10)]
LETTER_PIECES = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list("abcdefghijklmnopqrstuvwxyz")


def tiny_vocab() -> list[str]:
    """The vocabulary, deduplicated in a fixed order so token ids are stable across runs."""
    seen: dict[str, None] = {}
    for token in SPECIAL_TOKENS + PUNCTUATION + DIGITS + TOPIC_WORDS + TIME_AND_ACTION_WORDS + FILLER_WORDS + LETTER_PIECES:
        seen.setdefault(token, None)
    return list(seen)


def make_tiny_bert(folder: str | Path, *, seed: int = 0, max_position_embeddings: int = 512) -> Path:
    """Write a random BERT (hidden 32, 2 layers, 2 heads) and its fast tokenizer into `folder`; return it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=0,
    )
    # Seed only a private generator state so the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(folder)

    tokenizer = BertTokenizerFast(
        vocab={token: index for index, token in enumerate(vocab)},
        do_lower_case=True,
        model_max_length=max_position_embeddings,
    )
    tokenizer.save_pretrained(folder)
    return folder
