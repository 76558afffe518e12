#!/usr/bin/env bash
# The Debian packages some tests need, installed when missing (part of README's test command
# and so of CI's): Orthanc, the real PACS that `batchscan send` is tested against, with its
# DICOMweb plugin, the PACS a scan over DICOMweb and STOW-RS are tested against; dicom3tools'
# dciodvfy, DCMTK's dsrdump and Pixelmed's DicomSRValidator (pixelmed-apps), the validators
# every SR the tests make must pass, and a JDK to run the validator over many SRs in one Java
# process (tests/PixelmedSRValidator.java: a Java source file needs the compiler module, which
# the runtime pixelmed-apps pulls in lacks); podman, runc (podman's default crun refuses these
# machines' hybrid cgroups) and mmdebstrap, which build the image on a Debian base made here
# and run it (tests/test_container.py).
# As root with apt-get (CI): installs what is missing, and fails if it cannot. Otherwise it
# installs nothing and says so; those tests are then skipped with a visible reason.
set -euo pipefail
need=()
command -v Orthanc >/dev/null || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v dsrdump >/dev/null || need+=(dcmtk)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v DicomSRValidator >/dev/null || need+=(pixelmed-apps)
command -v javac >/dev/null || need+=(default-jdk-headless)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "debian-tools: not root with apt-get; tests that need ${need[*]} are skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
install || { apt-get update -q >/dev/null && install; }
echo "debian-tools: installed ${need[*]}" >&2
