#!/bin/bash
# CANN's environment (library paths, ASCEND_HOME_PATH), then the command. CANN 9 installs set_env.sh under
# /usr/local/Ascend/cann; earlier releases under /usr/local/Ascend/ascend-toolkit.
for env in /usr/local/Ascend/cann/set_env.sh /usr/local/Ascend/ascend-toolkit/set_env.sh; do
    if [ -f "$env" ]; then
        # shellcheck disable=SC1090
        source "$env"
        break
    fi
done
exec "$@"
