#!/usr/bin/env bash
# Installs Chromium for the headless-browser check of the HTML reports (tests/evaluation/test_report_browser.py
# screenshots report pages and checks that their plots load). Best effort, like install_wordnet.sh: without apt-get
# or root/sudo it says why and exits 0; the browser test then skips with that reason.
set -u

present() {
    command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]
}
if present; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get here; Chromium not installed (the browser check of the reports skips)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "install_chromium: need root or password-less sudo; run: sudo bash scripts/install_chromium.sh"
    exit 0
fi

apt_install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1
}

# Package lists may be empty (fresh containers; apt then fails to find the package): update once if needed.
apt_install
if ! present; then
    $SUDO apt-get update -qq >/dev/null 2>&1 && apt_install
fi
if present; then
    echo "install_chromium: installed chromium"
else
    echo "install_chromium: apt-get could not install chromium (offline?); the browser check of the reports skips"
fi
exit 0
