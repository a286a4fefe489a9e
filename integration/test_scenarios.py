"""The five scenarios the product answers (the seed use cases), end to end through Docker."""

import json
import subprocess
from pathlib import Path

from conftest import DOCKER, IMAGE, sh, unique, wait_for
from test_fence import no_leftovers, tree_digest


def fenced(repo, script, env=(), workspace="/workspace", extra=()):
    args = [DOCKER, "run", "--rm", "--runtime", "agentfense"]
    for e in env:
        args += ["-e", e]
    args += [*extra, "-v", f"{repo}:{workspace}", "-w", workspace, IMAGE, "sh", "-c", script]
    return sh(args)


def write(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_1_agent_review_without_secrets(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    write(repo, {
        ".env": "API_KEY=sk-1\n", "config/.env.local": "X=1\n", "deploy/server.key": "k\n",
        "certs/tls.pem": "p\n", "credentials/aws.json": "{}\n", "credentials.json": "{}\n",
        "src/auth.py": "# TODO check token\nKEY_NAME = 'API_KEY'\n", "src/util.py": "# TODO\n",
        "README.md": "readme\n",
    })
    digest = tree_digest(repo)
    p = fenced(repo, "find . | sort; echo ---; grep -rl TODO . | sort; echo ---; ls -la . config; "
                     "echo ---; for f in .env config/.env.local deploy/server.key certs/tls.pem "
                     "credentials/aws.json credentials.json; do cat $f; done",
               env=["AGENTFENSE_PRESET=agent-safe"])
    found, grepped, listing, _ = p.stdout.split("---\n")
    assert found.split() == [".", "./README.md", "./certs", "./config", "./deploy", "./src",
                             "./src/auth.py", "./src/util.py"]
    assert grepped.split() == ["./src/auth.py", "./src/util.py"]
    for secret in (".env", "server.key", "tls.pem", "credentials", "aws.json"):
        assert secret not in listing and secret not in found
    assert p.stderr.count("No such file or directory") == 6, p.stderr
    assert "Permission denied" not in p.stderr
    assert tree_digest(repo) == digest
    no_leftovers()


def test_2_untrusted_build(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    # The seed's policy, verbatim (no priorities). Under SPEC §3's ranking `/src/**` outranks
    # `**/*.tfvars` inside /src (longer literal prefix), so secrets there need a priority, as the
    # presets give theirs; the seed keeps them in /infra and at the root, where this works.
    write(repo, {"src/main.c": "int main(){}\n", "tests/t.sh": "echo ok\n", "build/.keep": "",
                 "infra/prod.tfvars": "password=1\n", "infra/main.tf": "x\n",
                 "terraform.tfvars": "y\n", ".env": "z\n"})
    policy = [
        {"pattern": "/src/**", "permission": "read"},
        {"pattern": "/tests/**", "permission": "read"},
        {"pattern": "/build/**", "permission": "write"},
        {"pattern": "/infra/**", "permission": "none"},
        {"pattern": "**/.env", "permission": "none"},
        {"pattern": "**/*.tfvars", "permission": "none"},
    ]
    p = fenced(repo, "ls; ls src; cat src/main.c tests/t.sh > build/out.txt && echo built; "
                     "cat build/out.txt; ls infra; cat ../workspace/infra/prod.tfvars; "
                     "cat terraform.tfvars; echo x > src/main.c",
               env=["AGENTFENSE_POLICY=" + json.dumps(policy)])
    assert p.stdout == "build\nsrc\ntests\nmain.c\nbuilt\nint main(){}\necho ok\n"
    assert p.stderr.count("No such file or directory") == 3, p.stderr
    assert "Permission denied" in p.stderr
    assert not (repo / "build" / "out.txt").exists()
    no_leftovers()


def test_3_many_tenants_over_one_base(docker_engine, image, tmp_path):
    base = tmp_path / "base"
    write(base, {"app/agent.py": "print('agent')\n", "output/.keep": ""})
    digest = tree_digest(base)
    tenants = [f"t{i}" for i in range(8)]
    names = {}
    for t in tenants:
        policy = [{"pattern": "/app/**", "permission": "read"},
                  {"pattern": f"/output/{t}/**", "permission": "write", "priority": 10},
                  {"pattern": "/output/**", "permission": "none"}]
        names[t] = unique()
        sh([DOCKER, "run", "-d", "--name", names[t], "--runtime", "agentfense",
            "-e", "AGENTFENSE_POLICY=" + json.dumps(policy), "-v", f"{base}:/workspace", IMAGE,
            "sh", "-c", f"mkdir /workspace/output/{t} && head -c 1048576 /dev/zero > "
                        f"/workspace/output/{t}/result.bin && echo written && sleep 1000"],
           check=True)
    try:
        # All tenants have written and are still running: now each looks at what it sees.
        for t in tenants:
            wait_for(lambda: "written" in sh([DOCKER, "logs", names[t]]).stdout, f"{t} to write",
                     timeout=60)
        for t in tenants:
            p = sh([DOCKER, "exec", names[t], "sh", "-c",
                    "ls /workspace/output; cat /workspace/app/agent.py; "
                    f"wc -c < /workspace/output/{t}/result.bin"])
            assert p.stdout == f"{t}\nprint('agent')\n1048576\n", (t, p.stdout, p.stderr)
    finally:
        for n in names.values():
            sh([DOCKER, "rm", "-f", n])
    assert tree_digest(base) == digest
    no_leftovers()


def test_4_view_lists_but_does_not_read(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    write(repo, {"src/a.py": "a\n", "configs/database.yaml": "password: x\n",
                 "configs/api.yaml": "url: y\n", "secrets/k": "k\n"})
    policy = [{"pattern": "/src/**", "permission": "read"},
              {"pattern": "/configs/**", "permission": "view"},
              {"pattern": "/secrets/**", "permission": "none"}]
    p = fenced(repo, "ls configs; ls -l configs | wc -l; cat configs/database.yaml; ls secrets",
               env=["AGENTFENSE_POLICY=" + json.dumps(policy)])
    assert p.stdout == "api.yaml\ndatabase.yaml\n3\n"
    assert "can't open 'configs/database.yaml': Permission denied" in p.stderr
    assert "secrets: No such file or directory" in p.stderr
    no_leftovers()


def test_5_plugin_manifest(docker_engine, image, tmp_path):
    repo = tmp_path / "repo"
    write(repo, {"src/main.py": "x = 1\n", "reports/.keep": "", "secrets/token": "t\n",
                 ".env": "e\n", "configs/c.yaml": "c\n"})
    manifest = [{"pattern": "/src/**", "permission": "read"},
                {"pattern": "/reports/**", "permission": "write"}]
    p = fenced(repo, "ls -a; wc -l src/main.py > reports/complexity.json; cat reports/complexity.json; "
                     "cat secrets/token .env configs/c.yaml",
               env=["AGENTFENSE_POLICY=" + json.dumps(manifest)])
    assert p.stdout == ".\n..\nreports\nsrc\n1 src/main.py\n"
    assert p.stderr.count("No such file or directory") == 3, p.stderr
    no_leftovers()
