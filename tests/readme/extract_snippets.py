#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the README's ```cpp blocks as one program: #include lines at file scope, everything else,
in order, inside main(). Usage: extract_snippets.py README.md OUT.cpp. Fails when the README has no
C++ block, so a renamed fence cannot turn the check into one that passes on nothing."""
import re
import sys

readme, out = sys.argv[1], sys.argv[2]
text = open(readme, encoding="utf-8").read()
blocks = re.findall(r"^```cpp\n(.*?)^```", text, flags=re.S | re.M)
if not blocks:
    sys.exit(f"extract_snippets.py: no ```cpp block in {readme}")
includes, body = [], []
for i, b in enumerate(blocks, 1):
    body.append(f"  // ---- README snippet {i}")
    for line in b.splitlines():
        if line.startswith("#include"):
            if line not in includes:
                includes.append(line)
        else:
            body.append("  " + line if line else "")
src = "// Generated from README.md by tests/readme/extract_snippets.py; do not edit.\n"
src += "\n".join(includes) + "\n\nint main() {\n" + "\n".join(body) + "\n  return 0;\n}\n"
try:
    if open(out, encoding="utf-8").read() == src:
        sys.exit(0)  # unchanged: keep the timestamp, no rebuild
except OSError:
    pass
open(out, "w", encoding="utf-8").write(src)
