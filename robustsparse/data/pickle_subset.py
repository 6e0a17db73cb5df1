"""A reader of the small subset of the pickle format (protocols 2 to 4) that data files such as CIFAR's python
batches use, written without the ``pickle`` module: nothing in the file can import or call anything.

The reader is a stack machine that knows only these opcodes:

    PROTO FRAME STOP MARK  EMPTY_DICT EMPTY_LIST EMPTY_TUPLE  SETITEM SETITEMS APPEND APPENDS
    TUPLE TUPLE1 TUPLE2 TUPLE3  NONE NEWTRUE NEWFALSE  BININT BININT1 BININT2 LONG1 BINFLOAT
    SHORT_BINSTRING BINSTRING  SHORT_BINUNICODE BINUNICODE BINUNICODE8  SHORT_BINBYTES BINBYTES BINBYTES8
    GLOBAL STACK_GLOBAL REDUCE BUILD  BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET

Any other opcode is refused. ``GLOBAL`` names are looked up in a table the caller passes (``stand_ins``: (module,
name) -> an inert object of the caller's own), never imported; ``REDUCE`` may only call such a stand-in, and
``BUILD`` may only call ``__setstate__`` on an instance of one of the caller's ``buildable`` classes. Strings of
Python 2 (``BINSTRING``) come back as ``bytes``, like ``pickle.load(..., encoding="bytes")``.
"""
from __future__ import annotations

import struct


class Refused(Exception):
    """The stream is not one this reader accepts; the message says why (nothing was run)."""


_MARK = object()


def load(data: bytes, stand_ins: dict, buildable: tuple = ()) -> object:
    """The object a pickle stream ``data`` describes, using only ``stand_ins`` for the names it refers to."""
    stack: list = []
    memo: dict = {}
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise Refused("the stream ends early (truncated file)")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    def uint(n: int) -> int:
        return int.from_bytes(take(n), "little")

    def pop_mark() -> list:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise Refused("an opcode needs a MARK that is not there")

    def pop():
        if not stack or stack[-1] is _MARK:
            raise Refused("an opcode found the stack empty")
        return stack.pop()

    def top():
        if not stack or stack[-1] is _MARK:
            raise Refused("an opcode found the stack empty")
        return stack[-1]

    def text(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused("a unicode string is not valid UTF-8") from None

    def lookup(module, name):
        if not (isinstance(module, str) and isinstance(name, str)) or (module, name) not in stand_ins:
            raise Refused(f"it refers to {module}.{name}, which was refused (nothing was run)")
        return stand_ins[(module, name)]

    callables = {id(v) for v in stand_ins.values() if callable(v)}
    while True:
        op = take(1)
        if op == b"\x80":  # PROTO
            if uint(1) > 4:
                raise Refused("pickle protocol 5 or later is not accepted")
        elif op == b"\x95":  # FRAME: a length hint only
            take(8)
        elif op == b".":  # STOP
            result = pop()
            if stack:
                raise Refused("values left on the stack at STOP")
            return result
        elif op == b"(":
            stack.append(_MARK)
        elif op == b"}":
            stack.append({})
        elif op == b"]":
            stack.append([])
        elif op == b")":
            stack.append(())
        elif op in (b"s", b"u"):  # SETITEM, SETITEMS
            items = [pop(), pop()][::-1] if op == b"s" else pop_mark()
            target = top()
            if not isinstance(target, dict) or len(items) % 2:
                raise Refused("SETITEM(S) on something that is not a dict")
            for key, value in zip(items[::2], items[1::2]):
                target[key] = value
        elif op in (b"a", b"e"):  # APPEND, APPENDS
            items = [pop()] if op == b"a" else pop_mark()
            target = top()
            if not isinstance(target, list):
                raise Refused("APPEND(S) on something that is not a list")
            target.extend(items)
        elif op == b"t":
            stack.append(tuple(pop_mark()))
        elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
            n = op[0] - 0x84
            items = [pop() for _ in range(n)][::-1]
            stack.append(tuple(items))
        elif op == b"N":
            stack.append(None)
        elif op in (b"\x88", b"\x89"):
            stack.append(op == b"\x88")
        elif op == b"J":
            stack.append(struct.unpack("<i", take(4))[0])
        elif op == b"K":
            stack.append(uint(1))
        elif op == b"M":
            stack.append(uint(2))
        elif op == b"\x8a":  # LONG1
            stack.append(int.from_bytes(take(uint(1)), "little", signed=True))
        elif op == b"G":
            stack.append(struct.unpack(">d", take(8))[0])
        elif op == b"U":
            stack.append(take(uint(1)))
        elif op == b"T":
            stack.append(take(struct.unpack("<i", take(4))[0]))
        elif op == b"\x8c":
            stack.append(text(take(uint(1))))
        elif op == b"X":
            stack.append(text(take(uint(4))))
        elif op == b"\x8d":
            stack.append(text(take(uint(8))))
        elif op == b"C":
            stack.append(take(uint(1)))
        elif op == b"B":
            stack.append(take(uint(4)))
        elif op == b"\x8e":
            stack.append(take(uint(8)))
        elif op == b"c":  # GLOBAL "module\nname\n"
            end1 = data.find(b"\n", pos)
            end2 = data.find(b"\n", end1 + 1) if end1 >= 0 else -1
            if end2 < 0:
                raise Refused("the stream ends early (truncated file)")
            module, name = data[pos:end1].decode("latin1"), data[end1 + 1:end2].decode("latin1")
            pos = end2 + 1
            stack.append(lookup(module, name))
        elif op == b"\x93":  # STACK_GLOBAL
            name, module = pop(), pop()
            stack.append(lookup(module, name))
        elif op == b"R":  # REDUCE
            args, func = pop(), pop()
            if id(func) not in callables or not isinstance(args, tuple):
                raise Refused("REDUCE of something other than an accepted name")
            stack.append(func(*args))
        elif op == b"b":  # BUILD
            state, obj = pop(), top()
            if not isinstance(obj, buildable):
                raise Refused(f"BUILD of a {type(obj).__name__}, which is not accepted")
            obj.__setstate__(state)
        elif op in (b"q", b"r", b"\x94"):  # BINPUT, LONG_BINPUT, MEMOIZE
            key = uint(1) if op == b"q" else uint(4) if op == b"r" else len(memo)
            memo[key] = top()
        elif op in (b"h", b"j"):  # BINGET, LONG_BINGET
            key = uint(1) if op == b"h" else uint(4)
            if key not in memo:
                raise Refused(f"memo entry {key} is read before it is written")
            stack.append(memo[key])
        else:
            raise Refused(f"it uses pickle opcode {op!r}, which this reader does not accept")
