//! Pulling from a real OCI registry: Debian's `docker-registry`, started here on 127.0.0.1 with
//! a config of our own, and images pushed into it with `skopeo` from the project's own OCI
//! archives (or layouts written here). Each test runs its own containerd, so a first pull is
//! cold. Nothing reaches any address but 127.0.0.1.
//!
//! Without `docker-registry` or `skopeo` the tests are skipped on a laptop and fail in CI.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use shale_provisioner::daemon::LocalContainerd;
use shale_provisioner::image_build;
use shale_provisioner::{
    ExitStatus, ImageRef, ProvisionError, Provisioner, ProvisionerConfig, RegistryAuth,
    RegistryConfig,
};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Whether the registry tools and containerd are installed; in CI their absence is a failure.
fn tools_present() -> bool {
    let runs = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if Path::new(REGISTRY_BIN).exists() && runs("skopeo") && runs("containerd") && runs("ctr") {
        return true;
    }
    eprintln!(
        "SKIPPED: needs docker-registry, skopeo and containerd (scripts/setup.sh installs them)"
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run the registry tests: docker-registry, skopeo and containerd are required"
    );
    false
}

/// A `docker-registry` on 127.0.0.1, storing under a temp dir; killed on drop.
struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    auth: TestAuth,
}

/// What the test registry demands.
enum TestAuth {
    None,
    /// htpasswd with one user.
    Basic(String, String),
    /// Token auth: JWTs signed by this RSA key, whose self-signed certificate the registry
    /// trusts. No token service runs: the tests sign tokens themselves and hand them over.
    Token {
        keys: tempfile::TempDir,
        cert_der: Vec<u8>,
    },
}

const TOKEN_ISSUER: &str = "shale-test-issuer";
const TOKEN_SERVICE: &str = "shale-test-registry";

impl Registry {
    fn start() -> Registry {
        Self::start_with(None)
    }

    /// With `creds`, the registry demands HTTP basic auth (htpasswd, bcrypt) for everything.
    fn start_with(creds: Option<(&str, &str)>) -> Registry {
        Self::start_auth(match creds {
            Some((u, p)) => TestAuth::Basic(u.into(), p.into()),
            None => TestAuth::None,
        })
    }

    /// A registry that accepts only bearer tokens signed by a key of the test's own.
    fn start_with_tokens() -> Registry {
        let keys = tempfile::tempdir().expect("key dir");
        let (key, cert) = (keys.path().join("key.pem"), keys.path().join("cert.pem"));
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=shale-test-issuer", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(der.status.success());
        Self::start_auth(TestAuth::Token {
            keys,
            cert_der: der.stdout,
        })
    }

    fn start_auth(test_auth: TestAuth) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("shale-registry-")
            .tempdir()
            .expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let auth = match &test_auth {
            TestAuth::None => String::new(),
            TestAuth::Basic(user, pass) => {
                let hash = bcrypt::hash(pass, 4).expect("bcrypt");
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: shale-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            TestAuth::Token { keys, .. } => {
                // The realm is only advertised; nothing listens on port 1 of loopback.
                let cert = keys.path().join("cert.pem");
                format!(
                    "auth:\n  token:\n    realm: http://127.0.0.1:1/token\n    \
                     service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    \
                     rootcertbundle: {}\n",
                    cert.display()
                )
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("storage").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("registry config");
        let mut r = Registry {
            dir,
            port,
            child: None,
            auth: test_auth,
        };
        r.restart();
        r
    }

    /// (Re)starts the registry on the same port and storage, and waits until it answers.
    fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("registry.log")).expect("log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on 127.0.0.1:{}: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The provider's config for this registry, good for pulling `repo` (token auth grants
    /// per repository).
    fn config_for(&self, repo: &str) -> RegistryConfig {
        RegistryConfig {
            host: self.host(),
            auth: match &self.auth {
                TestAuth::Basic(username, password) => RegistryAuth::Basic {
                    username: username.clone(),
                    password: password.clone(),
                },
                TestAuth::Token { .. } => RegistryAuth::Bearer {
                    token: self.token(repo, &["pull"]),
                },
                TestAuth::None => RegistryAuth::Anonymous,
            },
            insecure_http: true,
        }
    }

    fn config(&self) -> RegistryConfig {
        self.config_for("")
    }

    /// A JWT as a token service would issue it: RS256, the signing certificate in `x5c`, and
    /// `actions` on repository `repo`.
    fn token(&self, repo: &str, actions: &[&str]) -> String {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        use base64::Engine;
        let TestAuth::Token { keys, cert_der } = &self.auth else {
            panic!("not a token registry");
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header =
            serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [STANDARD.encode(cert_der)]});
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": "sp", "aud": TOKEN_SERVICE,
            "exp": now + 3600, "nbf": now - 60, "iat": now - 60, "jti": format!("{now}-{repo}"),
            "access": [{"type": "repository", "name": repo, "actions": actions}],
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sign = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(keys.path().join("key.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run openssl");
        sign.stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let sig = sign.wait_with_output().expect("openssl dgst");
        assert!(sig.status.success());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.stdout))
    }

    /// skopeo's flags for the credentials `repo_tag`'s repository needs.
    fn skopeo_auth(&self, dest: bool, repo_tag: &str) -> Vec<String> {
        let prefix = if dest { "--dest-" } else { "--" };
        let repo = repo_tag.split(':').next().unwrap_or(repo_tag);
        match &self.auth {
            TestAuth::None => vec![],
            TestAuth::Basic(u, p) => vec![format!("{prefix}creds={u}:{p}")],
            TestAuth::Token { .. } => vec![format!(
                "{prefix}registry-token={}",
                self.token(repo, &["pull", "push"])
            )],
        }
    }

    /// Pushes `source` (a skopeo transport: `oci-archive:PATH`, `oci:DIR:TAG`) as `repo:tag`
    /// and returns the manifest digest the registry stores it under.
    fn push(&self, source: &str, repo_tag: &str) -> String {
        let dest = format!("docker://{}/{repo_tag}", self.host());
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        cmd.args(self.skopeo_auth(true, repo_tag));
        let out = cmd.arg(source).arg(&dest).output().expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy {source} {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        sha256_hex(&self.raw_manifest(repo_tag))
    }

    /// The manifest as the registry serves it, through skopeo.
    fn raw_manifest(&self, repo_tag: &str) -> Vec<u8> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["inspect", "--raw", "--tls-verify=false"]);
        cmd.args(self.skopeo_auth(false, repo_tag));
        let out = cmd
            .arg(format!("docker://{}/{repo_tag}", self.host()))
            .output()
            .expect("run skopeo inspect");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The digests of the layers of `repo_tag`'s manifest.
    fn layers(&self, repo_tag: &str) -> Vec<String> {
        let m: serde_json::Value =
            serde_json::from_slice(&self.raw_manifest(repo_tag)).expect("manifest JSON");
        m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["digest"].as_str().expect("digest").to_string())
            .collect()
    }

    /// Where the registry keeps a blob's bytes.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sha256_hex(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A provisioner on a containerd of its own (so nothing is cached), no image imported.
struct Node {
    prov: Provisioner,
    config: ProvisionerConfig,
    /// Taken on drop, so the daemon stops before what it has mounted is detached.
    daemon: Option<LocalContainerd>,
    dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Node {
        Self::start_with_store(None).await
    }

    /// With `limit`, containerd's root and state live on a tmpfs of that many bytes: a disk
    /// that fills up.
    async fn start_with_store(limit: Option<u64>) -> Node {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("shale-pull-")
            .tempdir()
            .expect("temp dir");
        let ctd = dir.path().join("ctd");
        if let Some(bytes) = limit {
            std::fs::create_dir_all(&ctd).expect("ctd dir");
            nix::mount::mount(
                Some("tmpfs"),
                &ctd,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(format!("size={bytes}").as_str()),
            )
            .expect("mount a small tmpfs");
        }
        let daemon = LocalContainerd::spawn(&ctd).await.expect("containerd");
        let config = ProvisionerConfig {
            socket: daemon.socket().to_path_buf(),
            namespace: format!("shale-pull-{}", std::process::id()),
            state_dir: dir.path().join("state"),
            provider: "test-sp".into(),
            stop_grace: Duration::from_secs(2),
            cdi_dirs: vec![],
            ..Default::default()
        };
        let prov = Provisioner::connect(config.clone()).await.expect("connect");
        Node {
            prov,
            config,
            daemon: Some(daemon),
            dir,
        }
    }

    /// `ctr` on this node's daemon and namespace; its stdout.
    fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.config.socket)
            .args(["--namespace", &self.config.namespace])
            .args(args)
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn has_content(&self, digest: &str) -> bool {
        self.ctr(&["content", "ls", "--quiet"])
            .lines()
            .any(|l| l.trim() == digest)
    }

    /// Ingests in progress or abandoned: a failed pull must leave none.
    fn active_ingests(&self) -> Vec<String> {
        self.ctr(&["content", "active"])
            .lines()
            .skip(1)
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Node {
    /// Stops containerd first (it unmounts its own), then unmounts whatever a failed test left
    /// mounted under the temp dir (the tmpfs of a small store too), deepest first.
    fn drop(&mut self) {
        drop(self.daemon.take());
        unmount_under(self.dir.path());
    }
}

/// A 10.x.0.0/16 for the orders' links that no interface on the host uses yet.
fn free_subnet() -> String {
    let used = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let start = std::process::id() % 97;
    (0..97)
        .map(|i| 150 + (start + i) % 97)
        .find(|x| !used.contains(&format!(" 10.{x}.")))
        .map(|x| format!("10.{x}.0.0/16"))
        .expect("a free 10.x.0.0/16")
}

async fn busybox_archive() -> PathBuf {
    image_build::build_busybox_image(&image_build::default_cache_dir())
        .await
        .expect("busybox image build")
}

/// Writes a blob into an OCI layout's `blobs/sha256`; returns its digest and size.
fn put_blob(dir: &Path, data: &[u8]) -> (String, usize) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dir");
    let digest = sha256_hex(data);
    std::fs::write(blobs.join(&digest[7..]), data).expect("blob");
    (digest, data.len())
}

/// One image of one uncompressed layer holding `files` (raw tar names, so a test can write
/// names that `tar` refuses to create) into a layout; returns its manifest's digest and size.
fn put_image(dir: &Path, arch: &str, files: &[(&[u8], &[u8])]) -> (String, usize) {
    let mut layer = Vec::new();
    {
        let mut tar = tar::Builder::new(&mut layer);
        for (name, data) in files {
            let mut header = tar::Header::new_ustar();
            let field = &mut header.as_old_mut().name;
            field[..name.len()].copy_from_slice(name);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mtime(1_700_000_000);
            header.set_cksum();
            tar.append(&header, *data).expect("tar entry");
        }
        tar.finish().expect("tar");
    }
    let (layer_digest, layer_size) = put_blob(dir, &layer);
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put_blob(dir, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    put_blob(dir, manifest.to_string().as_bytes())
}

/// Finishes a layout whose `tag` names `descriptor`; returns skopeo's `oci:DIR:TAG`.
fn finish_layout(dir: &Path, tag: &str, mut descriptor: serde_json::Value) -> String {
    descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]});
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    format!("oci:{}:{tag}", dir.display())
}

/// An OCI layout of one linux/amd64 image holding `files`, tagged `tag`.
fn write_layout(dir: &Path, tag: &str, files: &[(&[u8], &[u8])]) -> String {
    let (digest, size) = put_image(dir, "amd64", files);
    finish_layout(
        dir,
        tag,
        serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": digest, "size": size}),
    )
}

/// Incompressible bytes, cheaply: a layer this size really has to travel.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_installs_the_image_and_a_second_pull_comes_from_cache() {
    if !tools_present() {
        return;
    }
    let archive = busybox_archive().await;
    let reg = Registry::start();
    let digest = reg.push(
        &format!("oci-archive:{}", archive.display()),
        "shale/busybox:1.35",
    );
    let node = Node::start().await;
    let reference = format!("{}/shale/busybox:1.35", reg.host());
    let image = ImageRef(reference.clone());
    assert!(!node.prov.has_image(&image).await.expect("has_image"));

    let cold = node
        .prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull by tag");
    assert_eq!(cold.image, image);
    assert_eq!(cold.digest, digest, "the digest the tag resolved to");
    assert_eq!(cold.manifest_digest, digest, "a single-platform image");
    assert!(cold.bytes >= cold.size && cold.size > 1_000_000, "{cold:?}");
    assert!(node.prov.has_image(&image).await.expect("has_image"));
    let stats = node.prov.pull_stats();
    assert_eq!(
        (stats.pulls_ok, stats.pulls_failed, stats.blobs_fetched),
        (1, 0, 2)
    );

    // Pulling again asks the registry where the tag points, and nothing else.
    let cached = node
        .prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull again");
    assert_eq!(cached.digest, digest);
    assert!(cached.bytes < 10_000, "only the manifest: {cached:?}");
    assert_eq!(node.prov.pull_stats().blobs_fetched, 2);
    eprintln!(
        "timing: busybox pull by tag, cold {:?} ({} bytes), cached {:?}",
        cold.took, cold.bytes, cached.took
    );

    // The pulled image runs: an order's container starts from it.
    let mut config = node.config.clone();
    config.image = image.clone();
    config.network.subnet = free_subnet().parse().unwrap();
    let prov = Provisioner::connect(config).await.expect("connect");
    prov.ensure(&lease(61))
        .await
        .expect("ensure from the pulled image");
    let (out, err, st) = run(&prov, 61, &["/bin/busybox", "echo", "pulled"]).await;
    assert_eq!(
        (out.as_str(), st),
        ("pulled\n", ExitStatus::Code(0)),
        "{err}"
    );
    prov.release(61).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_digest_needs_no_registry_once_present_and_a_wrong_digest_is_not_found() {
    if !tools_present() {
        return;
    }
    let archive = busybox_archive().await;
    let mut reg = Registry::start();
    let digest = reg.push(
        &format!("oci-archive:{}", archive.display()),
        "busybox:latest",
    );
    let node = Node::start().await;
    let reference = format!("{}/busybox@{digest}", reg.host());
    let pulled = node
        .prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull by digest");
    assert_eq!(pulled.image, ImageRef(reference.clone()));
    assert_eq!(pulled.digest, digest);
    assert!(node.prov.has_image(&pulled.image).await.unwrap());

    let wrong = format!("{}/busybox@sha256:{}", reg.host(), "0".repeat(64));
    let started = Instant::now();
    match node.prov.pull_image(&wrong, &[reg.config()]).await {
        Err(e @ ProvisionError::ImageNotFound { .. }) => {
            let text = e.to_string();
            assert!(text.contains("no such image or tag"), "{text}");
            assert!(text.contains(&reg.host()), "{text}");
            assert!(text.contains("404"), "{text}");
        }
        other => panic!("expected ImageNotFound, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "a 404 is not retried"
    );
    match node
        .prov
        .pull_image(&format!("{}/nosuch:tag", reg.host()), &[reg.config()])
        .await
    {
        Err(ProvisionError::ImageNotFound { .. }) => {}
        other => panic!("expected ImageNotFound, got {other:?}"),
    }

    // By digest, content already here is trusted as it is: the registry may be gone.
    reg.stop();
    let again = node
        .prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull by digest with the registry down");
    assert_eq!(again.bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_admits_the_right_password_and_refuses_a_wrong_one_by_name() {
    if !tools_present() {
        return;
    }
    let archive = busybox_archive().await;
    let reg = Registry::start_with(Some(("sp", "s3cret-pass")));
    reg.push(
        &format!("oci-archive:{}", archive.display()),
        "private/busybox:1",
    );
    let node = Node::start().await;
    let reference = format!("{}/private/busybox:1", reg.host());

    for (label, auth) in [
        (
            "wrong password",
            RegistryAuth::Basic {
                username: "sp".into(),
                password: "guess".into(),
            },
        ),
        ("no credentials", RegistryAuth::Anonymous),
    ] {
        let config = RegistryConfig {
            auth,
            ..reg.config()
        };
        let started = Instant::now();
        match node.prov.pull_image(&reference, &[config]).await {
            Err(e @ ProvisionError::RegistryUnauthorized { .. }) => {
                let text = e.to_string();
                assert!(text.contains("refused the credentials"), "{label}: {text}");
                assert!(text.contains("401"), "{label}: {text}");
                assert!(text.contains(&reg.host()), "{label}: {text}");
                assert!(!text.contains("guess"), "no secret in messages: {text}");
            }
            other => panic!("{label}: expected RegistryUnauthorized, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{label}: a 401 is not retried"
        );
    }
    assert!(!node
        .prov
        .has_image(&ImageRef(reference.clone()))
        .await
        .unwrap());

    let pulled = node
        .prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull with the right password");
    assert!(node.prov.has_image(&pulled.image).await.unwrap());
    let stats = node.prov.pull_stats();
    assert_eq!((stats.pulls_ok, stats.pulls_failed), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_is_sent_as_it_is_and_a_forged_one_is_refused() {
    if !tools_present() {
        return;
    }
    let archive = busybox_archive().await;
    let reg = Registry::start_with_tokens();
    reg.push(
        &format!("oci-archive:{}", archive.display()),
        "team/busybox:1",
    );
    let node = Node::start().await;
    let reference = format!("{}/team/busybox:1", reg.host());

    // A token for another repository, and one whose signature is not the issuer's.
    let other = reg.config_for("team/other");
    let mut forged = reg.config_for("team/busybox");
    if let RegistryAuth::Bearer { token } = &mut forged.auth {
        let cut = token.rfind('.').unwrap() + 1;
        token.replace_range(cut.., "AAAA");
    }
    for (label, config) in [("other repository", other), ("forged", forged)] {
        match node.prov.pull_image(&reference, &[config]).await {
            Err(ProvisionError::RegistryUnauthorized { .. }) => {}
            other => panic!("{label}: expected RegistryUnauthorized, got {other:?}"),
        }
    }
    let pulled = node
        .prov
        .pull_image(&reference, &[reg.config_for("team/busybox")])
        .await
        .expect("pull with a bearer token");
    assert!(node.prov.has_image(&pulled.image).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_digest_is_refused_and_nothing_of_it_is_committed() {
    if !tools_present() {
        return;
    }
    let archive = busybox_archive().await;
    let reg = Registry::start();
    reg.push(
        &format!("oci-archive:{}", archive.display()),
        "busybox:tampered",
    );
    let layer = reg.layers("busybox:tampered").remove(0);
    // Flip bytes in the middle of the stored layer: same size, other content, same name.
    let path = reg.blob_file(&layer);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("registry blob");
    let middle = f.metadata().unwrap().len() / 2;
    let mut bytes = [0u8; 16];
    f.seek(SeekFrom::Start(middle)).unwrap();
    f.read_exact(&mut bytes).unwrap();
    let original = bytes;
    for b in &mut bytes {
        *b ^= 0xff;
    }
    f.seek(SeekFrom::Start(middle)).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();

    let node = Node::start().await;
    let reference = format!("{}/busybox:tampered", reg.host());
    let started = Instant::now();
    match node.prov.pull_image(&reference, &[reg.config()]).await {
        Err(e @ ProvisionError::DigestMismatch { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&layer), "{text}");
            assert!(text.contains("does not match its digest"), "{text}");
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "a mismatch is not retried"
    );
    assert!(!node.has_content(&layer), "the bad layer was committed");
    assert_eq!(node.active_ingests(), Vec::<String>::new());
    let image = ImageRef(reference.clone());
    assert!(!node.prov.has_image(&image).await.unwrap());

    // Repaired, the same pull succeeds.
    f.seek(SeekFrom::Start(middle)).unwrap();
    f.write_all(&original).unwrap();
    f.sync_all().unwrap();
    node.prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull once the blob is repaired");
    assert!(node.prov.has_image(&image).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_stopped_mid_pull_fails_cleanly_and_the_pull_succeeds_once_it_is_back() {
    if !tools_present() {
        return;
    }
    let mut reg = Registry::start();
    let layout = tempfile::tempdir().expect("layout dir");
    let big = noise(160 << 20);
    let source = write_layout(layout.path(), "big", &[(b"data/noise.bin", &big)]);
    drop(big);
    reg.push(&source, "big:1");
    let layer = reg.layers("big:1").remove(0);
    let node = Node::start().await;
    let reference = format!("{}/big:1", reg.host());

    let prov = node.prov.clone();
    let config = reg.config();
    let r = reference.clone();
    let pull = tokio::spawn(async move { prov.pull_image(&r, &[config]).await });
    // Stop the registry once the layer is flowing.
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.prov.pull_stats().bytes < 8 << 20 {
        assert!(Instant::now() < deadline, "the pull never started moving");
        assert!(
            !pull.is_finished(),
            "the pull ended before the registry stopped"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    reg.stop();
    let stopped_at = Instant::now();
    match pull.await.expect("join") {
        Err(e @ ProvisionError::RegistryUnavailable { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&reg.host()), "{text}");
            assert!(text.contains(&reference), "{text}");
            assert!(text.contains("after 4 tries"), "{text}");
        }
        other => panic!("expected RegistryUnavailable, got {other:?}"),
    }
    let waited = stopped_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(30),
        "retried with backoff, bounded: {waited:?}"
    );
    assert!(!node.has_content(&layer), "a partial layer was committed");
    assert_eq!(node.active_ingests(), Vec::<String>::new());
    eprintln!("timing: registry stopped mid-pull, error after {waited:?}");

    reg.restart();
    let pulled = node
        .prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull with the registry back");
    assert!(node.has_content(&layer));
    assert!(node.prov.has_image(&pulled.image).await.unwrap());
    eprintln!(
        "timing: 160 MiB layer pulled in {:?} after the registry came back",
        pulled.took
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_up_during_a_pull_is_reported_and_keeps_no_partial_blob() {
    if !tools_present() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root"
        );
        return;
    }
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("layout dir");
    let source = write_layout(
        layout.path(),
        "large",
        &[(b"data/noise.bin", &noise(48 << 20))],
    );
    reg.push(&source, "large:1");
    let layer = reg.layers("large:1").remove(0);
    let node = Node::start_with_store(Some(24 << 20)).await;
    let reference = format!("{}/large:1", reg.host());
    match node.prov.pull_image(&reference, &[reg.config()]).await {
        Err(e @ ProvisionError::ImageStoreFull { .. }) => {
            let text = e.to_string();
            assert!(text.contains("no space left"), "{text}");
            assert!(text.contains(&reference), "{text}");
        }
        other => panic!("expected ImageStoreFull, got {other:?}"),
    }
    assert!(!node.has_content(&layer), "a partial layer was committed");
    assert_eq!(node.active_ingests(), Vec::<String>::new());
    assert!(!node
        .prov
        .has_image(&ImageRef(reference))
        .await
        .expect("has_image"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_pulls_of_one_image_share_one_transfer() {
    if !tools_present() {
        return;
    }
    let archive = busybox_archive().await;
    let reg = Registry::start();
    reg.push(
        &format!("oci-archive:{}", archive.display()),
        "busybox:shared",
    );
    let node = Node::start().await;
    let reference = format!("{}/busybox:shared", reg.host());
    let configs = [reg.config()];
    let (a, b) = tokio::join!(
        node.prov.pull_image(&reference, &configs),
        node.prov.pull_image(&reference, &configs)
    );
    let (a, b) = (a.expect("first pull"), b.expect("second pull"));
    assert_eq!(a.digest, b.digest);
    let stats = node.prov.pull_stats();
    assert_eq!(
        (stats.pulls_ok, stats.blobs_fetched, stats.in_flight),
        (2, 2, 0),
        "one transfer of the layer and the config: {stats:?}"
    );
    let (first, second) = if a.bytes > b.bytes { (a, b) } else { (b, a) };
    assert!(first.bytes >= first.size, "{first:?}");
    assert!(
        second.bytes < 10_000,
        "the second found it all present: {second:?}"
    );
    assert!(stats.bytes < first.size + 20_000, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_entry_naming_a_path_outside_the_root_lands_inside_it() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("layout dir");
    let nonce = format!("shale-escape-{}", std::process::id());
    let escaping = format!("../../../../../../../../tmp/{nonce}");
    let source = write_layout(
        layout.path(),
        "escape",
        &[(escaping.as_bytes(), b"outside?"), (b"bin/ok", b"inside")],
    );
    reg.push(&source, "escape:1");
    let node = Node::start().await;
    let reference = format!("{}/escape:1", reg.host());
    // containerd's applier resolves every entry inside the snapshot's root.
    node.prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull");
    assert!(
        !Path::new("/tmp").join(&nonce).exists(),
        "a layer entry escaped to /tmp"
    );
    let snapshots = node
        .dir
        .path()
        .join("ctd/root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let found = Command::new("find")
        .arg(&snapshots)
        .args(["-name", &nonce])
        .output()
        .expect("find");
    let found = String::from_utf8_lossy(&found.stdout);
    assert!(
        found.trim().ends_with(&format!("/fs/tmp/{nonce}")),
        "the entry is inside the layer's root: {found:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_arch_index_is_narrowed_to_linux_amd64_and_only_its_blobs_are_fetched() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("layout dir");
    // arm64 first: the choice is by platform, not by position.
    let (arm, arm_size) = put_image(layout.path(), "arm64", &[(b"arch", b"arm64")]);
    let (amd, amd_size) = put_image(layout.path(), "amd64", &[(b"arch", b"amd64")]);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm,
             "size": arm_size, "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd,
             "size": amd_size, "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    });
    let (index_digest, index_size) = put_blob(layout.path(), index.to_string().as_bytes());
    let source = finish_layout(
        layout.path(),
        "multi",
        serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json",
                           "digest": index_digest, "size": index_size}),
    );
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
            &source,
        ])
        .arg(format!("docker://{}/multi:1", reg.host()))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the registry serves for the tag (skopeo re-encodes what it pushes).
    let served: serde_json::Value = serde_json::from_slice(&reg.raw_manifest("multi:1")).unwrap();
    let served_digest = sha256_hex(&reg.raw_manifest("multi:1"));
    let entries = served["manifests"].as_array().expect("an index");
    let platform_digest = |arch: &str| {
        entries
            .iter()
            .find(|e| e["platform"]["architecture"] == arch)
            .and_then(|e| e["digest"].as_str())
            .expect("platform entry")
            .to_string()
    };
    let (served_amd, served_arm) = (platform_digest("amd64"), platform_digest("arm64"));

    let node = Node::start().await;
    let reference = format!("{}/multi:1", reg.host());
    let pulled = node
        .prov
        .pull_image(&reference, &[reg.config()])
        .await
        .expect("pull the index");
    assert_eq!(
        pulled.digest, served_digest,
        "the image is pinned to the index"
    );
    assert_eq!(pulled.manifest_digest, served_amd);
    assert!(node.prov.has_image(&pulled.image).await.unwrap());
    assert_eq!(
        node.prov.pull_stats().blobs_fetched,
        2,
        "amd64's layer and config only"
    );
    assert!(
        !node.has_content(&served_arm),
        "the arm64 manifest was not fetched"
    );
    // The digest pins it: pulling REPO@INDEX-DIGEST finds it all present.
    let by_digest = format!("{}/multi@{served_digest}", reg.host());
    let again = node
        .prov
        .pull_image(&by_digest, &[reg.config()])
        .await
        .expect("pull by the index digest");
    assert_eq!((again.bytes, again.manifest_digest), (0, served_amd));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_reference_is_refused_before_any_request() {
    if !tools_present() {
        return;
    }
    let node = Node::start().await;
    match node.prov.pull_image("127.0.0.1:1/Bad Name:tag", &[]).await {
        Err(e @ ProvisionError::ReferenceInvalid { .. }) => {
            assert!(e.to_string().contains("REGISTRY/REPO:TAG"), "{e}");
        }
        other => panic!("expected ReferenceInvalid, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_installs_the_new_image_and_orders_of_the_old_digest_still_find_theirs() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let node = Node::start().await;
    let entry = shale_provisioner::CatalogImage {
        reference: Some(format!("{}/team/tool:stable", reg.host())),
        archive: None,
        description: String::new(),
        gpu_ready: false,
        size_bytes: None,
        default: false,
    };
    let first = tempfile::tempdir().expect("layout dir");
    reg.push(
        &write_layout(first.path(), "v1", &[(b"etc/version", b"1\n")]),
        "team/tool:stable",
    );
    let old = node
        .prov
        .install_image("tool", &entry, &[reg.config()])
        .await
        .expect("installed");
    assert!(
        old.image
            .as_str()
            .ends_with(&format!("team/tool@{}", old.digest)),
        "{old:?}"
    );

    // The SP's registry now serves another image under the same tag.
    let second = tempfile::tempdir().expect("layout dir");
    reg.push(
        &write_layout(second.path(), "v2", &[(b"etc/version", b"2\n")]),
        "team/tool:stable",
    );
    let new = node
        .prov
        .install_image("tool", &entry, &[reg.config()])
        .await
        .expect("installed again");
    assert_ne!(new.digest, old.digest, "the tag moved");
    // Orders placed against either digest find exactly their own image.
    assert_eq!(
        node.prov.image_with_digest(&old.digest).await.unwrap(),
        old.image
    );
    assert_eq!(
        node.prov.image_with_digest(&new.digest).await.unwrap(),
        new.image
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_images_are_collected_but_the_offered_and_the_most_recent_stay() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let node = Node::start().await;
    let mut installed = Vec::new();
    for v in 1..=4u8 {
        let layout = tempfile::tempdir().expect("layout dir");
        let tag = format!("v{v}");
        reg.push(
            &write_layout(layout.path(), &tag, &[(b"etc/version", &[b'0' + v])]),
            &format!("team/tool:{tag}"),
        );
        let entry = shale_provisioner::CatalogImage {
            reference: Some(format!("{}/team/tool:{tag}", reg.host())),
            archive: None,
            description: String::new(),
            gpu_ready: false,
            size_bytes: None,
            default: false,
        };
        let image = node
            .prov
            .install_image(&tag, &entry, &[reg.config()])
            .await
            .expect("installed");
        installed.push(image);
        // containerd orders images by their update time, in whole seconds at worst.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // The catalog offers only v1 now; one unused image (the newest, v4) is kept.
    let offered = std::collections::HashSet::from([installed[0].digest.clone()]);
    let policy = shale_provisioner::ImageGcPolicy { keep_unused: 1 };
    let removed = node
        .prov
        .collect_images(&offered, &policy)
        .await
        .expect("collected");
    // v2 and v3 go, each under its tag and its pinned name.
    assert_eq!(removed.len(), 4, "{removed:?}");
    for (v, kept) in [(0, true), (1, false), (2, false), (3, true)] {
        let found = node.prov.image_with_digest(&installed[v].digest).await;
        assert_eq!(found.is_ok(), kept, "v{}: {found:?}", v + 1);
    }
    // Their content is gone from the store too.
    assert!(!node.has_content(&installed[1].digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_started_while_the_catalog_installs_waits_for_its_image() {
    if !tools_present() {
        return;
    }
    let archive = busybox_archive().await;
    let reg = Registry::start();
    let digest = reg.push(
        &format!("oci-archive:{}", archive.display()),
        "shale/tiny:1",
    );
    // A large image the installation fetches first, so the order's start finds nothing yet.
    let layout = tempfile::tempdir().expect("layout dir");
    let big = noise(96 << 20);
    reg.push(
        &write_layout(layout.path(), "big", &[(b"data/noise.bin", &big)]),
        "big:1",
    );
    drop(big);
    let node = Node::start().await;
    let mut config = node.config.clone();
    config.network.subnet = free_subnet().parse().unwrap();
    let prov = Provisioner::connect(config).await.expect("connect");
    let entry = |reference: String| shale_provisioner::CatalogImage {
        reference: Some(reference),
        archive: None,
        description: String::new(),
        gpu_ready: false,
        size_bytes: None,
        default: false,
    };
    let catalog = std::collections::BTreeMap::from([
        ("a-big".to_string(), entry(format!("{}/big:1", reg.host()))),
        (
            "tiny".to_string(),
            entry(format!("{}/shale/tiny:1", reg.host())),
        ),
    ]);
    let installing = {
        let prov = prov.clone();
        let registries = [reg.config()];
        tokio::spawn(async move { prov.install_catalog(&catalog, &registries).await })
    };
    while prov.pull_stats().in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        prov.image_with_digest(&digest).await.is_err(),
        "not there yet"
    );
    let spec = shale_provisioner::LeaseSpec {
        image: Some(digest.clone()),
        ..lease(62)
    };
    prov.ensure(&spec)
        .await
        .expect("the start waited for the installation");
    let (out, _, st) = run(&prov, 62, &["/bin/busybox", "echo", "waited"]).await;
    assert_eq!((out.as_str(), st), ("waited\n", ExitStatus::Code(0)));
    assert!(installing.await.unwrap().iter().all(Result::is_ok));
    prov.release(62).await.expect("release");

    // With no installation under way, an image that is not there is refused at once.
    let unknown = shale_provisioner::LeaseSpec {
        image: Some(format!("sha256:{}", "e".repeat(64))),
        ..lease(63)
    };
    let refused = prov.ensure(&unknown).await.expect_err("no such image");
    assert!(
        matches!(refused, ProvisionError::ImageMissing { .. }),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_would_eat_the_disk_reserve_is_refused_before_it_writes() {
    if !tools_present() {
        return;
    }
    let reg = Registry::start();
    let layout = tempfile::tempdir().expect("layout dir");
    let source = write_layout(
        layout.path(),
        "large",
        &[(b"data/noise.bin", &noise(8 << 20))],
    );
    reg.push(&source, "large:1");
    let layer = reg.layers("large:1").remove(0);
    let node = Node::start().await;
    // The store's disk has far less free than this reserve.
    let mut config = node.config.clone();
    config.image_store = node.dir.path().to_path_buf();
    config.image_store_reserve_bytes = 1 << 60;
    let prov = Provisioner::connect(config).await.expect("connect");
    let reference = format!("{}/large:1", reg.host());
    match prov.pull_image(&reference, &[reg.config()]).await {
        Err(e @ ProvisionError::ImageStoreFull { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("MiB free") && text.contains(&reference),
                "{text}"
            );
        }
        other => panic!("expected ImageStoreFull, got {other:?}"),
    }
    assert!(
        !node.has_content(&layer),
        "nothing of the layer was written"
    );
    assert!(
        prov.pull_stats().bytes < 64 << 10,
        "only the manifest and config travelled"
    );
}
