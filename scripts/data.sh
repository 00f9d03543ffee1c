# Sourced by scripts/run.sh and scripts/test.sh: install the data the default job and the real-data tests read
# (Debian's dataset-fashion-mnist and fortunes) through apt-get where missing and root. $DATA_HINT ends the warning.
install_data() {
  local pkg file
  for pkg in dataset-fashion-mnist:/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
             fortunes:/usr/share/games/fortunes/fortunes; do
    file=${pkg#*:}; pkg=${pkg%%:*}
    if [ ! -f "$file" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg") >/dev/null 2>&1 \
        || echo "warning: could not install $pkg; ${DATA_HINT:-pass data.root=<folder>}"
    fi
  done
}
