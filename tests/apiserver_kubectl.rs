//! Real kubectl 1.32 against the real `kpve server`.

mod support;

use support::{Server, vm_manifest, wait_until};

fn write(server: &Server, name: &str, text: &str) -> String {
    let path = server.data_dir().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn crds_apply_idempotently_and_are_served() {
    let server = Server::start();
    let out = server.kubectl_ok(&["apply", "-f", "manifests/crds/"]);
    assert!(out.contains("virtualmachines.kpve.io"), "{out}");
    let again = server.kubectl_ok(&["apply", "-f", "manifests/crds/"]);
    let crds = std::fs::read_dir("manifests/crds").unwrap().count();
    assert_eq!(again.matches("unchanged").count(), crds, "second apply changes nothing:\n{again}");
    let crds = server.kubectl_ok(&["get", "crd"]);
    assert!(crds.contains("hypervisors.kpve.io"), "{crds}");
    server.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/virtualmachines.kpve.io",
        "--timeout=30s",
    ]);
    let resources = server.kubectl_ok(&["api-resources"]);
    for expected in ["virtualmachines", "linuxcontainers", "namespaces", "leases", "events"] {
        assert!(resources.contains(expected), "{expected} in api-resources:\n{resources}");
    }
    let ns = server.kubectl_ok(&["get", "namespaces"]);
    assert!(ns.contains("default") && ns.contains("kube-system") && ns.contains("Active"), "{ns}");
}

#[test]
fn client_side_apply_get_diff_explain_describe() {
    let server = Server::start();
    let file = write(&server, "vm.yaml", &vm_manifest("web", 2, ""));
    let out = server.kubectl_ok(&["apply", "-f", &file]);
    assert!(out.contains("virtualmachine.kpve.io/web created"), "{out}");
    let yaml = server.kubectl_ok(&["get", "vm", "web", "-o", "yaml"]);
    assert!(yaml.contains("vmid: 100"), "a VMID is allocated:\n{yaml}");
    assert!(yaml.contains("generation: 1"), "{yaml}");
    assert!(yaml.contains("uid:") && yaml.contains("creationTimestamp:"), "{yaml}");

    // Unchanged manifest: nothing to do.
    let out = server.kubectl_ok(&["apply", "-f", &file]);
    assert!(out.contains("unchanged"), "{out}");

    // diff shows the pending change and exits 1; apply makes it; then diff is quiet.
    write(&server, "vm.yaml", &vm_manifest("web", 4, ""));
    let diff = server.kubectl(&["diff", "-f", &file]);
    assert_eq!(diff.status.code(), Some(1), "diff: {}", stderr(&diff));
    let diff_text = String::from_utf8_lossy(&diff.stdout);
    assert!(diff_text.contains("-    cores: 2") && diff_text.contains("+    cores: 4"), "{diff_text}");
    let out = server.kubectl_ok(&["apply", "-f", &file]);
    assert!(out.contains("configured"), "{out}");
    let diff = server.kubectl(&["diff", "-f", &file]);
    assert_eq!(diff.status.code(), Some(0), "no diff after apply: {}", String::from_utf8_lossy(&diff.stdout));
    let gen_ =
        server.kubectl_ok(&["get", "vm", "web", "-o", "jsonpath={.metadata.generation} {.spec.cpu.cores}"]);
    assert_eq!(gen_, "2 4");

    // Printer columns from the CRD.
    let table = server.kubectl_ok(&["get", "vm"]);
    let header = table.lines().next().unwrap();
    for column in ["NAME", "VMID", "NODE", "POWER", "STATE", "READY", "AGE"] {
        assert!(header.contains(column), "{column} in {header}");
    }
    assert!(table.contains("web") && table.contains("100") && table.contains("Stopped"), "{table}");
    let wide = server.kubectl_ok(&["get", "vm", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("CPUS"), "{wide}");

    let explain = server.kubectl_ok(&["explain", "virtualmachines.spec.cpu"]);
    assert!(explain.contains("cores") && explain.contains("sockets"), "{explain}");

    // describe prints the object and the core/v1 Events about it.
    let uid = server.kubectl_ok(&["get", "vm", "web", "-o", "jsonpath={.metadata.uid}"]);
    let event = format!(
        "apiVersion: v1\nkind: Event\nmetadata:\n  name: web.test1\n  namespace: default\ninvolvedObject:\n  apiVersion: kpve.io/v1alpha1\n  kind: VirtualMachine\n  name: web\n  namespace: default\n  uid: {uid}\nreason: Scheduled\nmessage: placed on node1 by the test\ntype: Normal\nsource:\n  component: test\nfirstTimestamp: \"2026-11-21T10:00:00Z\"\nlastTimestamp: \"2026-11-21T10:00:00Z\"\ncount: 1\n"
    );
    let event_file = write(&server, "event.yaml", &event);
    server.kubectl_ok(&["create", "-f", &event_file]);
    server.kubectl_ok(&["create", "namespace", "team-a"]);
    assert!(
        server
            .kubectl_ok(&["get", "ns", "team-a", "--show-labels"])
            .contains("kubernetes.io/metadata.name=team-a")
    );
    let describe = server.kubectl_ok(&["describe", "vm", "web"]);
    assert!(describe.contains("Name:") && describe.contains("web"), "{describe}");
    assert!(describe.contains("placed on node1 by the test"), "event in describe:\n{describe}");
}

#[test]
fn invalid_manifest_is_refused_with_the_field_named() {
    let server = Server::start();
    let bad = write(&server, "bad.yaml", &vm_manifest("bad", 0, "  bogus: 1\n"));
    let out = server.kubectl(&["apply", "-f", &bad]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bogus"), "unknown field named: {err}");
    let bad = write(&server, "bad.yaml", &vm_manifest("bad", 0, ""));
    let out = server.kubectl(&["apply", "-f", &bad]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("spec.cpu.cores"), "invalid field named: {err}");
    let out = server.kubectl(&["get", "vm", "bad"]);
    assert!(!out.status.success(), "nothing was stored");
    // Strict validation refuses duplicate fields too.
    let dup = write(
        &server,
        "dup.json",
        r#"{"apiVersion":"kpve.io/v1alpha1","kind":"VirtualMachine","metadata":{"name":"dup"},"spec":{"cpu":{"cores":1,"cores":2}}}"#,
    );
    let out = server.kubectl(&[
        "create",
        "--raw",
        "/apis/kpve.io/v1alpha1/namespaces/default/virtualmachines?fieldValidation=Strict",
        "-f",
        &dup,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("duplicate field") && stderr(&out).contains("spec.cpu.cores"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn server_side_apply_conflicts_and_force() {
    let server = Server::start();
    let file = write(&server, "vm.yaml", &vm_manifest("ssa", 2, ""));
    let out = server.kubectl_ok(&["apply", "--server-side", "-f", &file]);
    assert!(out.contains("serverside-applied"), "{out}");
    write(&server, "vm.yaml", &vm_manifest("ssa", 3, ""));
    server.kubectl_ok(&["apply", "--server-side", "-f", &file]);
    assert_eq!(server.kubectl_ok(&["get", "vm", "ssa", "-o", "jsonpath={.spec.cpu.cores}"]), "3");
    let managers =
        server.kubectl_ok(&["get", "vm", "ssa", "-o", "jsonpath={.metadata.managedFields[*].manager}"]);
    assert!(managers.contains("kubectl"), "{managers}");

    // Another manager wants a different value of a field kubectl owns.
    write(&server, "vm.yaml", &vm_manifest("ssa", 6, ""));
    let out = server.kubectl(&["apply", "--server-side", "--field-manager=other", "-f", &file]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("conflict") && err.contains(".spec.cpu.cores"), "{err}");
    server.kubectl_ok(&["apply", "--server-side", "--field-manager=other", "--force-conflicts", "-f", &file]);
    assert_eq!(server.kubectl_ok(&["get", "vm", "ssa", "-o", "jsonpath={.spec.cpu.cores}"]), "6");

    // Dry run changes nothing.
    write(&server, "vm.yaml", &vm_manifest("ssa", 8, ""));
    server.kubectl_ok(&["apply", "--server-side", "--field-manager=other", "--dry-run=server", "-f", &file]);
    assert_eq!(server.kubectl_ok(&["get", "vm", "ssa", "-o", "jsonpath={.spec.cpu.cores}"]), "6");
}

#[test]
fn wait_for_ready_and_delete_with_finalizer() {
    let server = Server::start();
    let file = write(&server, "vm.yaml", &vm_manifest("fin", 2, ""));
    server.kubectl_ok(&["apply", "-f", &file]);

    let waiter = server
        .kubectl_background("kube-cache-wait", &["wait", "--for=condition=Ready", "vm/fin", "--timeout=60s"]);
    // Not ready yet: a condition from an older generation does not count.
    server.kubectl_ok(&[
        "patch", "vm", "fin", "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"observedGeneration":0,"conditions":[{"type":"Ready","status":"True","reason":"Test","message":"","lastTransitionTime":"2026-11-21T10:00:00Z","observedGeneration":0}]}}"#,
    ]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!waiter.is_finished(), "kubectl wait must not accept a stale observedGeneration");
    server.kubectl_ok(&[
        "patch", "vm", "fin", "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"observedGeneration":1,"conditions":[{"type":"Ready","status":"True","reason":"Test","message":"","lastTransitionTime":"2026-11-21T10:00:00Z","observedGeneration":1}]}}"#,
    ]);
    let out = waiter.join().unwrap();
    assert!(out.status.success(), "kubectl wait: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("condition met"));
    // Status writes do not bump generation; main writes ignore status.
    assert_eq!(server.kubectl_ok(&["get", "vm", "fin", "-o", "jsonpath={.metadata.generation}"]), "1");

    server.kubectl_ok(&[
        "patch",
        "vm",
        "fin",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["kpve.io/test"]}}"#,
    ]);
    server.kubectl_ok(&["delete", "vm", "fin", "--wait=false"]);
    let ts = server.kubectl_ok(&["get", "vm", "fin", "-o", "jsonpath={.metadata.deletionTimestamp}"]);
    assert!(!ts.is_empty(), "terminating, not gone");
    // A new finalizer cannot be added while terminating.
    let out = server.kubectl(&[
        "patch",
        "vm",
        "fin",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["kpve.io/test","kpve.io/other"]}}"#,
    ]);
    assert!(!out.status.success(), "adding a finalizer to a terminating object is refused");

    let deleter = server.kubectl_background("kube-cache-del", &["delete", "vm", "fin", "--timeout=60s"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!deleter.is_finished(), "kubectl delete waits for the finalizer");
    server.kubectl_ok(&[
        "patch",
        "vm",
        "fin",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers/0"}]"#,
    ]);
    let out = deleter.join().unwrap();
    assert!(out.status.success(), "kubectl delete: {}", stderr(&out));
    let out = server.kubectl(&["get", "vm", "fin"]);
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
}

#[test]
fn apply_prune_with_label_selector() {
    let server = Server::start();
    let dir = server.data_dir().join("site");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), vm_manifest("a", 1, "")).unwrap();
    std::fs::write(dir.join("b.yaml"), vm_manifest("b", 1, "")).unwrap();
    let dir_s = dir.to_str().unwrap();
    // kubectl's default prune allowlist names Pods, Deployments and the like, which kpve does
    // not serve; GitOps pipelines name the kinds they own.
    let allow = "--prune-allowlist=kpve.io/v1alpha1/VirtualMachine";
    server.kubectl_ok(&["apply", "-f", dir_s, "--prune", allow, "-l", "app=demo"]);
    assert_eq!(server.kubectl_ok(&["get", "vm", "-l", "app=demo", "-o", "name"]).lines().count(), 2);
    std::fs::remove_file(dir.join("b.yaml")).unwrap();
    let out = server.kubectl_ok(&["apply", "-f", dir_s, "--prune", allow, "-l", "app=demo"]);
    assert!(out.contains("virtualmachine.kpve.io/b pruned"), "{out}");
    wait_until("b to be gone", || !server.kubectl(&["get", "vm", "b"]).status.success());
    assert!(server.kubectl(&["get", "vm", "a"]).status.success());
}
