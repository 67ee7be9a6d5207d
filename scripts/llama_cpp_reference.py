#!/usr/bin/env python3
"""Greedy tokens from llama.cpp for the exactness fixture (model/tests/fixtures/).

Needs llama-cpp-python (`pip install llama-cpp-python` builds llama.cpp from source;
about 20 minutes on 2 cores). Its AMX matmul path crashes in VMs that do not grant AMX
tile state, so extra buffer types (AMX, weight repacking) are turned off.

Usage: llama_cpp_reference.py MODEL.gguf '["prompt one", "prompt two"]' [MAX_TOKENS]
Prints a JSON list of {prompt, prompt_tokens, tokens}.
"""
import json
import sys

import llama_cpp
from llama_cpp import Llama


def _params_without_extra_bufts():
    params = _default_params()
    params.use_extra_bufts = False
    return params


_default_params = llama_cpp.llama_model_default_params
llama_cpp.llama_model_default_params = _params_without_extra_bufts
llama_cpp.llama.llama_cpp.llama_model_default_params = _params_without_extra_bufts


def main():
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    llm = Llama(model_path=model, n_ctx=512, n_threads=2, n_batch=512, verbose=False, seed=0)
    out = []
    for prompt in prompts:
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        generated = []
        for t in llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t == llm.token_eos() or len(generated) >= max_tokens:
                break
            generated.append(t)
        out.append({"prompt": prompt, "prompt_tokens": tokens, "tokens": generated})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
