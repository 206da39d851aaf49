//! The `shale` binary runs from anywhere: copied into an empty folder and run with the checkout
//! it was built from out of sight, `shale dev up` brings the whole local stack up and
//! `shale dev down` takes it away.
//!
//! "Out of sight" is literal: every `shale` command runs in a mount namespace of its own in which
//! each folder of the checkout is covered by an empty read-only tmpfs, so a path compiled into
//! the binary (`env!("CARGO_MANIFEST_DIR")`, `<repo>/.state`, the image scripts under
//! `provisioner/image/`) finds nothing there, exactly as after the clone was deleted. Two things
//! stay reachable, each handed over explicitly rather than found through the build path:
//!
//! - the tools `scripts/setup.sh` installed (anvil, solc-js): the checkout's `.tools` is linked
//!   beside the binary, as an install laid out as `PREFIX/bin/shale` + `PREFIX/.tools` has it;
//! - the image cache, bind-mounted into the temporary folder and named by `SHALE_IMAGE_CACHE`,
//!   so the test reuses the default image the other end-to-end tests build (a cold build is
//!   minutes of `mmdebstrap`) instead of building its own. The cache key hashes the scripts'
//!   text, so a hit also shows that the binary's embedded scripts are the checkout's.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context};
use shale_tests::client::shale_exe;

/// Run by `unshare` in the new mount namespace: bind the image cache into place, cover every
/// folder of the checkout except `.tools`, then run the command.
const HIDE_CHECKOUT: &str = r#"
repo=$1 images=$2
shift 2
mount --bind "$repo/.state/images" "$images"
for d in "$repo"/* "$repo"/.[!.]*; do
    [ -d "$d" ] && [ ! -L "$d" ] || continue
    [ "${d##*/}" = .tools ] && continue
    mount -t tmpfs -o ro,size=4k,mode=0555 shale-checkout-hidden "$d"
done
exec "$@"
"#;

/// A copied `shale` binary with a home of its own in a temporary folder.
struct Relocated {
    repo: PathBuf,
    dir: tempfile::TempDir,
}

impl Relocated {
    fn new() -> anyhow::Result<Self> {
        let built = shale_exe()?;
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the workspace root")?
            .canonicalize()?;
        let dir = tempfile::Builder::new()
            .prefix("shale-relocated-")
            .tempdir()?;
        ensure!(
            !dir.path().starts_with(&repo),
            "the temporary folder {} is inside the checkout; set TMPDIR elsewhere",
            dir.path().display()
        );
        // The gateway's unprivileged SSH process must reach its state under here.
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755))?;
        let d = dir.path();
        for sub in ["opt/bin", "home", "images", "work"] {
            std::fs::create_dir_all(d.join(sub))?;
            std::fs::set_permissions(d.join(sub), PermissionsExt::from_mode(0o755))?;
        }
        std::fs::copy(&built, d.join("opt/bin/shale"))?;
        std::os::unix::fs::symlink(repo.join(".tools"), d.join("opt/.tools"))?;
        std::fs::create_dir_all(repo.join(".state/images"))?;
        // The demo dataset is a small CSV the other stacks may have fetched already; copied, so
        // the test needs no Debian mirror for it when they have.
        let digits = repo.join(".state/datasets/digits");
        if digits.join("digits.csv").is_file() {
            let to = d.join("home/datasets/digits");
            std::fs::create_dir_all(&to)?;
            for f in ["digits.csv", "README"] {
                if digits.join(f).is_file() {
                    std::fs::copy(digits.join(f), to.join(f))?;
                }
            }
        }
        Ok(Relocated { repo, dir })
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// `shale ARGS` from the copied binary, with the checkout hidden, in an empty working folder
    /// and an environment that names nothing in the checkout.
    fn shale(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--"])
            .args(["sh", "-ec", HIDE_CHECKOUT, "sh"])
            .arg(&self.repo)
            .arg(self.path("images"))
            .arg(self.path("opt/bin/shale"))
            .args(args)
            .current_dir(self.path("work"))
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", self.path("work"))
            .env("SHALE_HOME", self.path("home"))
            .env("SHALE_IMAGE_CACHE", self.path("images"))
            .stdin(std::process::Stdio::null())
            .output()
            .context("running unshare (util-linux)")?;
        Ok(out)
    }

    /// Every file `dev up` wrote (configs, logs, state), for a look at what they name.
    fn written(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() && entry.file_name() != "containerd" => walk(&path, found),
                    Ok(t) if t.is_file() => found.push(path),
                    _ => {}
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.path("home/dev"), &mut found);
        found
    }
}

impl Drop for Relocated {
    fn drop(&mut self) {
        let _ = self.shale(&["dev", "down"]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_copied_binary_brings_the_dev_stack_up_with_its_checkout_gone() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        ensure!(std::env::var("CI").is_err(), "CI runs as root");
        eprintln!("SKIPPED: shale dev up and the mount namespace need root");
        return Ok(());
    }
    let stack = Relocated::new()?;

    // The namespace really hides the checkout: the scripts an old binary ran are not there.
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .args(["sh", "-ec", HIDE_CHECKOUT, "sh"])
        .arg(&stack.repo)
        .arg(stack.path("images"))
        .args(["test", "!", "-e"])
        .arg(stack.repo.join("provisioner/image/build-default.sh"))
        .output()?;
    ensure!(
        probe.status.success(),
        "the checkout is still visible in the namespace: {}",
        text(&probe)
    );

    let up = stack.shale(&["dev", "up"])?;
    let up_text = text(&up);
    ensure!(up.status.success(), "shale dev up failed:\n{up_text}");

    let status = stack.shale(&["--json", "dev", "status"])?;
    ensure!(
        status.status.success(),
        "shale dev status: {}",
        text(&status)
    );
    let state: serde_json::Value = serde_json::from_slice(&status.stdout)
        .with_context(|| format!("dev status printed no JSON: {}", text(&status)))?;
    let dev_dir = stack.path("home/dev");
    ensure!(
        state["dir"].as_str().map(Path::new) == Some(dev_dir.canonicalize()?.as_path()),
        "the stack lives in SHALE_HOME/dev: {state}"
    );
    ensure!(
        dev_dir.join("gateway.toml").is_file() && dev_dir.join("gateway.log").is_file(),
        "the stack's config and logs are in {}",
        dev_dir.display()
    );
    // The cache is bind-mounted only inside the namespace: dev up's report says which it used.
    let image = format!("image {}/default-", stack.path("images").display());
    ensure!(
        up_text.contains(&image),
        "the default image came from SHALE_IMAGE_CACHE ({image}…):\n{up_text}"
    );
    ensure!(
        stack.path("home/datasets/digits/digits.csv").is_file(),
        "the dataset cache is in SHALE_HOME"
    );
    let repo = stack.repo.to_string_lossy().into_owned();
    ensure!(
        !up_text.contains(&repo),
        "dev up's output names the checkout {repo}:\n{up_text}"
    );
    for file in stack.written() {
        let bytes = std::fs::read(&file)?;
        ensure!(
            !String::from_utf8_lossy(&bytes).contains(&repo),
            "{} names the checkout {repo}",
            file.display()
        );
    }

    let down = stack.shale(&["dev", "down"])?;
    ensure!(down.status.success(), "shale dev down: {}", text(&down));
    ensure!(!dev_dir.exists(), "dev down removed {}", dev_dir.display());
    Ok(())
}
