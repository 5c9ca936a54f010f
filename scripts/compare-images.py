#!/usr/bin/env python3
"""Mean per-pixel absolute difference (0-255) of same-named 8-bit grayscale PNGs in folders
against a reference folder, as a Markdown table. Standard library only.

    python3 scripts/compare-images.py REFERENCE_DIR DIR [DIR ...]
"""
import pathlib
import struct
import sys
import zlib


def read_gray8(path):
    """Pixels of a non-interlaced 8-bit grayscale PNG, row by row (PNG spec 2003, §9 filters)."""
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, color, interlace) == (8, 0, 0), f"{path}: not 8-bit grayscale"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, rows, prev = zlib.decompress(idat), [], bytearray(width)
    for y in range(height):
        line = raw[y * (width + 1):(y + 1) * (width + 1)]
        f, cur = line[0], bytearray(line[1:])
        for x in range(width):
            a = cur[x - 1] if x else 0
            b, c = prev[x], (prev[x - 1] if x else 0)
            if f == 1:
                cur[x] = (cur[x] + a) & 255
            elif f == 2:
                cur[x] = (cur[x] + b) & 255
            elif f == 3:
                cur[x] = (cur[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[x] = (cur[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(cur)
        prev = cur
    return [v for r in rows for v in r]


def main():
    ref, others = pathlib.Path(sys.argv[1]), [pathlib.Path(d) for d in sys.argv[2:]]
    names = sorted(p.name for p in ref.glob("*.png"))
    assert names, f"no PNGs in {ref}"
    print(f"| images | against {ref.name}: mean abs difference per pixel (0-255) | worst image |")
    print("|---|---|---|")
    for d in others:
        diffs = []
        for n in names:
            a, b = read_gray8(ref / n), read_gray8(d / n)
            diffs.append(sum(abs(x - y) for x, y in zip(a, b)) / len(a))
        print(f"| {d.name} | {sum(diffs) / len(diffs):.2f} | {max(diffs):.2f} |")
    print(f"\n{len(names)} images (same prompts and seeds in every folder).")


if __name__ == "__main__":
    main()
