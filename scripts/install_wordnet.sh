#!/usr/bin/env bash
# Installs WordNet 3.0 for offline METEOR (data.md §5): the Debian packages wordnet-base and wordnet-sense-index.
# percausal_jax.evaluation.wordnet builds its nltk copy from them on first use. Also installs the lexnames(5WN) man
# page, from which that copy's `lexnames` file is generated, even where dpkg is set to skip man pages (minimized
# Docker images). Best effort: without apt-get or root/sudo it says why and exits 0; METEOR then reports how to
# install WordNet, and ROUGE works regardless.
set -u

MAN_PAGE=/usr/share/man/man5/lexnames.5WN.gz
present() {
    [ -f /usr/share/wordnet/index.sense ] && [ -f /usr/share/wordnet/data.noun ] && [ -f "$MAN_PAGE" ]
}
if present; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_wordnet: no apt-get here; WordNet not installed (METEOR unavailable, ROUGE unaffected)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_wordnet: need root or password-less sudo; run: sudo bash scripts/install_wordnet.sh"
    exit 0
fi

apt_install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall --no-install-recommends \
        -o Dpkg::Options::=--path-include="$MAN_PAGE" wordnet-base wordnet-sense-index >/dev/null 2>&1
}

# Package lists may be empty (fresh containers; apt then "succeeds" without installing): update once if needed.
apt_install
if ! present; then
    $SUDO apt-get update -qq >/dev/null 2>&1 && apt_install
fi
if present; then
    echo "install_wordnet: installed wordnet-base and wordnet-sense-index"
else
    echo "install_wordnet: apt-get could not install wordnet-base wordnet-sense-index (offline?); METEOR unavailable"
fi
exit 0
