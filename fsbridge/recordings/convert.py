"""WAV to MP3 with lame or ffmpeg, one process per conversion."""

from __future__ import annotations

import logging
import shutil

from gevent import subprocess

log = logging.getLogger("fsbridge.recordings")

class ConversionError(Exception):
    pass


class Mp3Converter:
    """Runs lame (Debian package `lame`) or ffmpeg (package `ffmpeg`)."""

    def __init__(self, executable: str, kind: str):
        if kind not in ("lame", "ffmpeg"):
            raise ValueError(f"unknown converter {kind!r}")
        self.executable = executable
        self.kind = kind

    @classmethod
    def find(cls) -> "Mp3Converter | None":
        for kind in ("lame", "ffmpeg"):
            path = shutil.which(kind)
            if path:
                return cls(path, kind)
        return None

    def argv(self, src: str, dst: str) -> list[str]:
        # VBR quality 5: speech stays clear at a fraction of the WAV size.
        if self.kind == "lame":
            return [self.executable, "--quiet", "--nohist", "-V", "5", src, dst]
        return [
            self.executable, "-nostdin", "-loglevel", "error", "-y", "-i", src,
            "-codec:a", "libmp3lame", "-q:a", "5", "-f", "mp3", dst,
        ]

    def convert(self, src: str, dst: str, timeout: float) -> None:
        """src -> dst (dst must not be the final name: the caller renames it)."""
        try:
            proc = subprocess.Popen(
                self.argv(src, dst), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            raise ConversionError(f"cannot run {self.executable}: {exc.strerror}") from None
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise ConversionError(f"{self.kind} took longer than {timeout:g} s") from None
        except BaseException:
            # The worker is being stopped: leave no orphan encoder behind.
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            detail = output.decode("utf-8", "replace").strip()[-500:]
            raise ConversionError(f"{self.kind} exited with {proc.returncode}: {detail}")
        if not looks_like_mp3(dst):
            raise ConversionError(f"{self.kind} wrote no MP3 data to {dst}")


def looks_like_mp3(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(3)
    except OSError:
        return False
    # An ID3v2 tag, or an MPEG audio frame (11 sync bits).
    return head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
