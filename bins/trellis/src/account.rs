//! `trellis totp`, `trellis reset-password`, `trellis verify-email`: the
//! account's second factor and the mailed-token flows, from a terminal.

use clap::Subcommand;
use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;
use trellis_proto::auth::v1 as auth;

use crate::{CliError, Client, Io, json, read_line};

#[derive(Subcommand, Debug)]
pub enum TotpCommand {
    /// Start two-factor authentication: a new secret for your authenticator
    /// app (a QR code on a terminal), confirmed by `totp confirm`.
    Enroll {
        /// Print the QR code even when standard output is not a terminal.
        #[arg(long)]
        qr: bool,
    },
    /// Turn it on with the app's current code; prints your recovery codes
    /// (each works once, in place of a code).
    Confirm { code: String },
    /// Turn it off (your password and the app's current code).
    Disable {
        /// The app's current code (asked for on a terminal).
        #[arg(long)]
        code: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ResetCommand {
    /// Mail a reset token to the account's address (said the same whether
    /// or not an account has it).
    Request { email: String },
    /// Set a new password with the mailed token; every session of the
    /// account ends.
    Apply {
        token: String,
        /// Read the new password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
}

/// `text` as a QR code of half-height blocks, dark on light, with its quiet
/// zone.
pub fn qr(text: &str) -> Option<String> {
    let code = QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .build(),
    )
}

impl Client {
    pub(crate) async fn totp(&self, io: &mut Io<'_>, action: TotpCommand) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = self.auth();
        match action {
            TotpCommand::Enroll { qr: force } => {
                let r = client
                    .enroll_totp(self.unary(auth::EnrollTotpRequest {}, Some(&bearer))?)
                    .await?
                    .into_inner();
                if self.json {
                    return json::print(io.out, &r);
                }
                if (force || io.color)
                    && let Some(code) = qr(&r.otpauth_uri)
                {
                    writeln!(io.out, "{code}")?;
                }
                writeln!(io.out, "secret: {}", r.secret)?;
                writeln!(io.out, "uri:    {}", r.otpauth_uri)?;
                writeln!(
                    io.err,
                    "add it to your authenticator app (scan the code or type the secret), then: trellis totp confirm CODE"
                )?;
            }
            TotpCommand::Confirm { code } => {
                let r = client
                    .confirm_totp(self.unary(
                        auth::ConfirmTotpRequest {
                            code: code.trim().to_string(),
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner();
                writeln!(
                    io.err,
                    "two-factor authentication is on; keep these recovery codes somewhere safe, each works once in place of a code:"
                )?;
                if self.json {
                    return json::print(io.out, &r);
                }
                for c in r.recovery_codes {
                    writeln!(io.out, "{c}")?;
                }
            }
            TotpCommand::Disable {
                code,
                password_stdin,
            } => {
                let password = self
                    .password(io, "password: ", password_stdin, false)
                    .await?;
                let code = match code {
                    Some(c) => c,
                    None if io.terminal && !password_stdin => {
                        write!(io.err, "authenticator code: ")?;
                        io.err.flush()?;
                        read_line(io.stdin).await?.unwrap_or_default()
                    }
                    None => {
                        return Err(CliError::Usage(
                            "pass --code CODE (the authenticator app's current code)".into(),
                        ));
                    }
                };
                client
                    .disable_totp(self.unary(
                        auth::DisableTotpRequest {
                            password,
                            code: code.trim().to_string(),
                        },
                        Some(&bearer),
                    )?)
                    .await?;
                writeln!(io.out, "two-factor authentication is off")?;
            }
        }
        Ok(())
    }

    pub(crate) async fn reset_password(
        &self,
        io: &mut Io<'_>,
        action: ResetCommand,
    ) -> Result<(), CliError> {
        let mut client = self.auth();
        match action {
            ResetCommand::Request { email } => {
                client
                    .request_password_reset(self.unary(
                        auth::RequestPasswordResetRequest {
                            email: email.clone(),
                        },
                        None,
                    )?)
                    .await?;
                writeln!(
                    io.out,
                    "if {email} has an account, a reset token is on its way there: trellis reset-password apply TOKEN"
                )?;
            }
            ResetCommand::Apply {
                token,
                password_stdin,
            } => {
                let new_password = self
                    .password(io, "new password: ", password_stdin, true)
                    .await?;
                client
                    .reset_password(self.unary(
                        auth::ResetPasswordRequest {
                            token: token.trim().to_string(),
                            new_password,
                        },
                        None,
                    )?)
                    .await?;
                // Every session ended, this terminal's too.
                if let Some(creds) = &self.creds {
                    creds.remove(&self.server)?;
                }
                writeln!(
                    io.out,
                    "password changed; every session ended: trellis login"
                )?;
            }
        }
        Ok(())
    }

    /// `trellis verify-email [TOKEN]`: without a token, mail a new one.
    pub(crate) async fn verify_email(
        &self,
        io: &mut Io<'_>,
        token: Option<String>,
    ) -> Result<(), CliError> {
        let mut client = self.auth();
        match token {
            Some(token) => {
                client
                    .verify_email(self.unary(
                        auth::VerifyEmailRequest {
                            token: token.trim().to_string(),
                        },
                        None,
                    )?)
                    .await?;
                writeln!(io.out, "e-mail address verified")?;
            }
            None => {
                let bearer = self.bearer().await?;
                client
                    .request_email_verification(
                        self.unary(auth::RequestEmailVerificationRequest {}, Some(&bearer))?,
                    )
                    .await?;
                writeln!(
                    io.out,
                    "a verification token is on its way to your address: trellis verify-email TOKEN"
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qr_code_is_square_blocks_with_a_quiet_zone() {
        let code =
            qr("otpauth://totp/Trellis:ada%40example.com?secret=JBSWY3DPEHPK3PXP&issuer=Trellis")
                .expect("encodes");
        let lines: Vec<&str> = code.lines().collect();
        let width = lines[0].chars().count();
        assert!(
            width >= 29,
            "at least version 3 plus the quiet zone: {width}"
        );
        assert!(lines.iter().all(|l| l.chars().count() == width));
        // Two modules a character: about half as many lines as columns.
        assert!(
            lines.len() * 2 >= width && lines.len() * 2 <= width + 2,
            "{}",
            lines.len()
        );
        assert!(
            code.chars()
                .all(|c| matches!(c, ' ' | '█' | '▀' | '▄' | '\n'))
        );
    }
}
