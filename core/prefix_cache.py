"""Prefix cache: a radix tree over full KV pages.

Each node is one full page of tokens (its key is the page's token ids) under the node of the preceding
page, so a path from the root spells a cached prefix. The tree holds its own reference on every page it
keeps, so a page outlives the request that filled it; a page is evictable when the tree's reference is the
only one left. Eviction removes least-recently-used leaves first (a prefix is never dropped before its
extensions). Both the MLA latent and the indexer keys live at the same slots, so one tree covers both.
"""

from __future__ import annotations

import itertools

from dsv32.core.kv_cache import PageAllocator


class _Node:
    __slots__ = ("key", "page", "parent", "children", "last_used")

    def __init__(self, key: tuple[int, ...], page: int, parent: "_Node | None"):
        self.key, self.page, self.parent = key, page, parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_used = 0


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self.root = _Node((), -1, None)
        self._clock = itertools.count(1)
        self.num_pages = 0
        self.hit_tokens = 0
        self.query_tokens = 0

    def _chunks(self, tokens: list[int]):
        P = self.page_size
        for i in range(len(tokens) // P):
            yield tuple(tokens[i * P:(i + 1) * P])

    def match(self, tokens: list[int], max_pages: int) -> list[int]:
        """Pages holding the longest cached prefix of `tokens` (at most max_pages), each incref'd for the caller."""
        node, pages, now = self.root, [], next(self._clock)
        for key in itertools.islice(self._chunks(tokens), max_pages):
            child = node.children.get(key)
            if child is None:
                break
            child.last_used = now
            self.allocator.incref(child.page)
            pages.append(child.page)
            node = child
        self.query_tokens += len(tokens)
        self.hit_tokens += len(pages) * self.page_size
        return pages

    def peek(self, tokens: list[int], max_pages: int) -> int:
        """Tokens of the longest cached prefix of `tokens` (at most max_pages pages), changing nothing."""
        node, n = self.root, 0
        for key in itertools.islice(self._chunks(tokens), max_pages):
            node = node.children.get(key)
            if node is None:
                break
            n += 1
        return n * self.page_size

    def insert(self, tokens: list[int], pages: list[int]) -> None:
        """Record the full pages of a request's computed tokens (pages[i] holds tokens of page i)."""
        node, now = self.root, next(self._clock)
        for key, page in zip(self._chunks(tokens), pages):
            child = node.children.get(key)
            if child is None:
                child = _Node(key, page, node)
                node.children[key] = child
                self.allocator.incref(page)
                self.num_pages += 1
            child.last_used = now
            node = child

    def evict(self, num_pages: int) -> int:
        """Free up to num_pages pages referenced only by the tree, LRU leaves first. Returns how many."""
        freed = 0
        while freed < num_pages:
            leaves = [n for n in self._nodes() if not n.children and self.allocator.refcount(n.page) == 1]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.last_used)
            for leaf in leaves[: num_pages - freed]:
                del leaf.parent.children[leaf.key]
                self.allocator.release([leaf.page])
                self.num_pages -= 1
                freed += 1
        return freed

    def evictable(self) -> int:
        return sum(1 for n in self._nodes() if self.allocator.refcount(n.page) == 1)

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def clear(self) -> None:
        for n in list(self._nodes()):
            self.allocator.release([n.page])
        self.root.children.clear()
        self.num_pages = 0
