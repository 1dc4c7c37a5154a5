"""The prefix cache: the KV blocks of prompts already run, reused by later prompts that begin the same way
(a system prompt, the chat template, few-shot examples, the n choices of one prompt).

A prompt is cut into blocks of BLOCK tokens. Block i's key hashes its tokens with block i-1's key, so a key
stands for the whole prefix up to its block's end (as vLLM and nano-vllm key theirs). Once a prompt is in its
cache row, its full blocks are copied out; a new prompt copies the longest run of its blocks that are kept into
its own row, and its prefill starts after them. The rows stay contiguous, so no step needs block tables: a copy
costs far less than computing the block. Blocks go least recently used first, the longer prefixes before the
shorter ones they extend, to stay within a byte bound.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

BLOCK = 16  # tokens per block


def block_keys(tokens: list[int]) -> list[int]:
    """The key of each full block of `tokens`: a hash of the block's tokens and of the key before it."""
    keys, key = [], 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        key = hash((key, tuple(tokens[start:start + BLOCK])))
        keys.append(key)
    return keys


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.blocks: OrderedDict[int, torch.Tensor] = OrderedDict()  # key -> (layers, 2, kv heads, BLOCK, dim)
        # prompt tokens copied from kept blocks (hit) or left to compute (miss), and blocks evicted
        self.stats = {"hit_tokens": 0, "miss_tokens": 0, "evicted_blocks": 0}

    def summary(self) -> dict:
        return self.stats | {"blocks": len(self.blocks), "bytes": self.bytes, "max_bytes": self.max_bytes}

    def reuse(self, prompt: list[int], kv_cache: list[tuple[torch.Tensor, torch.Tensor]], row: int) -> int:
        """Copy the longest kept run of the prompt's first blocks into cache row `row`; returns the tokens it
        holds. The prompt's last token is always left to compute: its logits give the first new token."""
        keys = []
        for key in block_keys(prompt[:-1]):
            if key not in self.blocks:
                break
            keys.append(key)
        if keys:
            run = torch.cat([self.blocks[key] for key in keys], dim=3)
            for layer, (k, v) in enumerate(kv_cache):
                k[row, :, :run.size(3)] = run[layer, 0]
                v[row, :, :run.size(3)] = run[layer, 1]
            self.touch(keys)
        reused = len(keys) * BLOCK
        self.stats["hit_tokens"] += reused
        self.stats["miss_tokens"] += len(prompt) - reused
        return reused

    def keep(self, prompt: list[int], kv_cache: list[tuple[torch.Tensor, torch.Tensor]], row: int) -> None:
        """The prompt is in cache row `row`: keep copies of its full blocks that are not kept yet."""
        keys = block_keys(prompt)
        first = next((i for i, key in enumerate(keys) if key not in self.blocks), len(keys))
        if first < len(keys):  # one copy per layer of the new run, cut into blocks after
            run = slice(first * BLOCK, len(keys) * BLOCK)
            new = torch.stack([torch.stack((k[row, :, run], v[row, :, run])) for k, v in kv_cache])
            for key, block in zip(keys[first:], new.split(BLOCK, dim=3)):
                if key not in self.blocks:
                    self.blocks[key] = block.clone()
                    self.bytes += block.nbytes
        self.touch(keys)
        while self.bytes > self.max_bytes and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.bytes -= block.nbytes
            self.stats["evicted_blocks"] += 1

    def touch(self, keys: list[int]) -> None:
        """Most recently used: a prefix's first block last, so the blocks that extend it go before it does."""
        for key in reversed(keys):
            self.blocks.move_to_end(key)
