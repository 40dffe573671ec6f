"""A decode process of `DecodePool(mode="processes")`: `python -m pipeline.decodechild`.

Not for people to run: it speaks the length-prefixed pickle protocol of `pipeline.decodepool`
on its stdin and stdout.
"""

import sys

from pipeline.decodepool import serve

if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
