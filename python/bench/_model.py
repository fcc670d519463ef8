# SPDX-License-Identifier: Apache-2.0
"""What the model-capture scripts (kv_spectrum.py, kv_quant_error.py) share: their common
arguments, loading SmolLM2 from the project's GGUF through transformers (fp32, one thread), and
the first --tokens tokens of each text."""
import pathlib
import time

import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_TEXTS = [str(ROOT / ".cache/texts/kjv-genesis.txt"), str(ROOT / ".cache/texts/gpl3.txt")]


def add_common_args(p, csv_default):
    """TEXT ..., --model, --tokens and --csv, with the project's defaults."""
    p.add_argument("texts", nargs="*", default=DEFAULT_TEXTS)
    p.add_argument("--model", default=str(ROOT / ".cache/model/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--csv", default=str(csv_default))


def load(model_path):
    """(model, tokenizer) from a GGUF file, fp32, eval mode, torch on one thread."""
    torch.set_num_threads(1)
    mp = pathlib.Path(model_path)
    t0 = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(mp.parent), gguf_file=mp.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(mp.parent), gguf_file=mp.name)
    print(f"model loaded in {time.time() - t0:.0f} s")
    return model, tok


def token_ids(tok, texts, tokens):
    """(name, ids [1, <= tokens]) for each text file: its stem and its first `tokens` token ids."""
    for text in texts:
        ids = tok(pathlib.Path(text).read_text(), return_tensors="pt").input_ids[:, :tokens]
        yield pathlib.Path(text).stem, ids
