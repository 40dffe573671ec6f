"""A decode process of `DecodePool(mode="processes")`: `python -m pipeline.decodechild FD`.

Not for people to run: it reads requests from its stdin and writes answers to the inherited
pipe FD, in the length-prefixed pickle protocol of `pipeline.decodepool`.
"""

import os
import sys

from pipeline.decodepool import serve

if __name__ == "__main__":
    serve(sys.stdin.buffer, os.fdopen(int(sys.argv[1]), "wb"))
