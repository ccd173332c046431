#!/usr/bin/env python3
"""Writes an OCI image (an image layout directory and the same as one tar archive that
`ctr images import`, `podman load` and `skopeo` read) from one binary, without Docker.

The image holds exactly what the binary needs: the binary (less its DWARF debug info) at
/usr/local/bin/<name>, the shared libraries `ldd` names (and the dynamic loader) at their
paths, CA certificates, a non-root user (65532, "ringmaster") in /etc/passwd and
/etc/group, and a writable /tmp. Two layers: the base (libraries, certificates, users;
shared by images built from the same libraries) and the binary, with a third between
them for --library. Every tar entry has a fixed owner, mode and time, entries
are sorted and gzip carries no timestamp, so the same inputs give the same digest.

  images/oci.py BINARY NAME:TAG OUT_DIR [--env KEY=VALUE]... [--library PATH]...

--library: a shared library the binary opens at run time (dlopen, which ldd cannot see),
with the libraries it needs, in a layer of its own between the base and the binary.

Prints the manifest digest and the image size (compressed layers).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

UID = 65532
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# A fixed time for every entry: 2000-01-01, not 0, which some tools read as "unset".
EPOCH = 946684800


def shared_libraries(binary):
    """The files `ldd` resolves for the binary, the loader included."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        sys.exit(f"ldd {binary} failed: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            target = parts[parts.index("=>") + 1]
            if target == "not":
                sys.exit(f"{binary}: {line.strip()}")
            if target.startswith("/"):
                libs.append(target)
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return sorted(set(libs))


class Layer:
    """A reproducible tar layer: directories, files and symlinks with fixed metadata."""

    def __init__(self):
        self.entries = {}

    def _dirs(self, path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            self.entries.setdefault(d, ("dir", 0o755, None))

    def dir(self, path, mode=0o755):
        self._dirs(path + "/x")
        self.entries[path.strip("/")] = ("dir", mode, None)

    def file(self, path, data, mode=0o644):
        self._dirs(path)
        self.entries[path.strip("/")] = ("file", mode, data)

    def host_file(self, path, mode=None):
        """`path` from this machine, at the same path (a symlink is kept, with its target)."""
        if os.path.islink(path):
            target = os.readlink(path)
            self._dirs(path)
            self.entries[path.strip("/")] = ("link", 0o777, target)
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
            self.host_file(resolved, mode)
            return
        with open(path, "rb") as f:
            data = f.read()
        self.file(path, data, mode if mode is not None else (os.stat(path).st_mode & 0o755) | 0o444)

    def tar(self):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(self.entries):
                kind, mode, data = self.entries[name]
                info = tarfile.TarInfo(name)
                info.mode, info.mtime, info.uid, info.gid = mode, EPOCH, 0, 0
                info.uname = info.gname = ""
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "link":
                    info.type, info.linkname = tarfile.SYMTYPE, data
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return raw.getvalue()


def base_layer(libraries):
    layer = Layer()
    for lib in libraries:
        layer.host_file(lib)
    if os.path.exists(CA_BUNDLE):
        layer.host_file(CA_BUNDLE, 0o644)
    layer.file("etc/passwd", f"root:x:0:0:root:/root:/sbin/nologin\nringmaster:x:{UID}:{UID}:ringmaster:/tmp:/sbin/nologin\n".encode())
    layer.file("etc/group", f"root:x:0:\nringmaster:x:{UID}:\n".encode())
    layer.file("etc/nsswitch.conf", b"hosts: files dns\n")
    layer.dir("tmp", 0o1777)
    return layer


def without_debug_info(binary):
    """The binary's bytes less its DWARF (`strip --strip-debug`, deterministic): a sixth of
    the size. Symbols stay, so backtraces still name functions; the release binary keeps
    its line tables for profiling."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "stripped")
        done = subprocess.run(["strip", "--strip-debug", "-o", out, binary], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"strip --strip-debug {binary} failed: {done.stderr.strip()}")
        with open(out, "rb") as f:
            return f.read()


def library_layer(libraries, base):
    """Run-time libraries and what they need, less what the base layer has."""
    layer = Layer()
    for lib in sorted(set(libraries)):
        for path in [lib] + shared_libraries(lib):
            if path not in base:
                layer.host_file(path)
    return layer


def app_layer(binary, name):
    layer = Layer()
    layer.file(f"usr/local/bin/{name}", without_debug_info(binary), 0o755)
    return layer


class Blobs:
    def __init__(self, out):
        self.dir = os.path.join(out, "blobs", "sha256")
        os.makedirs(self.dir, exist_ok=True)

    def put(self, data, media_type):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.dir, digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def build(binary, reference, out, env, libraries=()):
    name = os.path.basename(binary)
    if os.path.exists(out):
        shutil.rmtree(out)
    blobs = Blobs(out)
    layers, diff_ids = [], []
    base = shared_libraries(binary)
    stack = [base_layer(base)]
    if libraries:
        stack.append(library_layer(libraries, base))
    stack.append(app_layer(binary, name))
    for layer in stack:
        tar = layer.tar()
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        compressed = gzip.compress(tar, compresslevel=6, mtime=0)
        layers.append(blobs.put(compressed, "application/vnd.oci.image.layer.v1.tar+gzip"))
    config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "created": "2000-01-01T00:00:00Z",
        "config": {
            "User": f"{UID}:{UID}",
            "Entrypoint": [f"/usr/local/bin/{name}"],
            "Env": ["PATH=/usr/local/bin", f"SSL_CERT_FILE={CA_BUNDLE}", "HOME=/tmp"] + env,
            "WorkingDir": "/tmp",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_desc = blobs.put(canonical(config), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layers,
    }
    manifest_desc = blobs.put(canonical(manifest), "application/vnd.oci.image.manifest.v1+json")
    tag = reference.rsplit(":", 1)[1] if ":" in reference.rsplit("/", 1)[-1] else "latest"
    manifest_desc["annotations"] = {
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": tag,
    }
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(canonical({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}))
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(canonical({"imageLayoutVersion": "1.0.0"}))
    archive(out)
    size = sum(layer["size"] for layer in layers)
    print(f"{reference} {manifest_desc['digest']} {size / 2**20:.1f} MiB")
    return manifest_desc["digest"], size


def archive(out):
    """The layout as one tar (`image.tar` beside it), fixed metadata, sorted."""
    names = []
    for root, _, files in os.walk(out):
        for f in files:
            path = os.path.relpath(os.path.join(root, f), out)
            if path != "image.tar":
                names.append(path)
    with tarfile.open(os.path.join(out, "image.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(names):
            info = tar.gettarinfo(os.path.join(out, path), arcname=path)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = EPOCH, 0, 0, "", "", 0o644
            with open(os.path.join(out, path), "rb") as f:
                tar.addfile(info, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("reference", help="image name, e.g. ghcr.io/ringmaster-dev/ringmaster:0.2.0")
    ap.add_argument("out", help="directory for the OCI layout (replaced)")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the image config")
    ap.add_argument("--library", action="append", default=[], help="a library the binary loads at run time")
    args = ap.parse_args()
    build(args.binary, args.reference, args.out, args.env, args.library)


if __name__ == "__main__":
    main()
