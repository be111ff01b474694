//! The tokens `trellis login` keeps, per server, in one JSON file readable
//! only by its owner (`credentials.json` in the configuration directory,
//! mode 0600, replaced atomically).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One server's session: the token pair of the last login or refresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub username: String,
    pub access_token: String,
    /// Unix seconds.
    pub access_expires: i64,
    pub refresh_token: String,
    /// Unix seconds.
    pub refresh_expires: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    servers: BTreeMap<String, Entry>,
}

/// The credentials file of one configuration directory.
#[derive(Debug, Clone)]
pub struct Credentials {
    path: PathBuf,
}

impl Credentials {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("credentials.json"),
        }
    }

    /// Where the configuration lives: `$TRELLIS_CONFIG_DIR` (or the flag),
    /// else `$XDG_CONFIG_HOME/trellis`, else `~/.config/trellis`.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(x).join("trellis"));
        }
        std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|h| PathBuf::from(h).join(".config").join("trellis"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> std::io::Result<File> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not a credentials file: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
            Err(e) => Err(e),
        }
    }

    fn write(&self, file: &File) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".credentials.{}.tmp", std::process::id()));
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)
    }

    pub fn get(&self, server: &str) -> std::io::Result<Option<Entry>> {
        Ok(self.read()?.servers.get(server).cloned())
    }

    pub fn put(&self, server: &str, entry: Entry) -> std::io::Result<()> {
        let mut file = self.read()?;
        file.servers.insert(server.to_string(), entry);
        self.write(&file)
    }

    /// Forgets `server`'s session; true when there was one.
    pub fn remove(&self, server: &str) -> std::io::Result<bool> {
        let mut file = self.read()?;
        let had = file.servers.remove(server).is_some();
        if had {
            self.write(&file)?;
        }
        Ok(had)
    }
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: &str) -> Entry {
        Entry {
            username: user.into(),
            access_token: format!("a-{user}"),
            access_expires: 10,
            refresh_token: format!("r-{user}"),
            refresh_expires: 20,
        }
    }

    #[test]
    fn sessions_are_kept_per_server_in_an_owner_only_file() {
        let dir = tempfile::tempdir().expect("ok");
        let c = Credentials::new(&dir.path().join("nested"));
        assert_eq!(c.get("http://a").expect("ok"), None);
        c.put("http://a", entry("ada")).expect("ok");
        c.put("http://b", entry("bob")).expect("ok");
        assert_eq!(c.get("http://a").expect("ok"), Some(entry("ada")));
        assert_eq!(c.get("http://b").expect("ok").expect("ok").username, "bob");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(c.path())
                .expect("ok")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(c.remove("http://a").expect("ok"));
        assert!(!c.remove("http://a").expect("ok"));
        assert_eq!(c.get("http://a").expect("ok"), None);
        assert!(c.get("http://b").expect("ok").is_some());
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("nested"))
            .expect("ok")
            .map(|e| e.expect("ok").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("credentials.json")]);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_login() {
        let dir = tempfile::tempdir().expect("ok");
        let c = Credentials::new(dir.path());
        std::fs::write(c.path(), b"{not json").expect("ok");
        let e = c.get("http://a").expect_err("an error");
        assert!(e.to_string().contains("not a credentials file"), "{e}");
    }
}
