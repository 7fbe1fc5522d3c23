//! The operational stage: negotiation of session and connection parameters.

use super::{
    status, Login, MAX_BURST_LIMIT, OUR_FIRST_BURST, OUR_MAX_BURST, OUR_MAX_OUTSTANDING_R2T,
};
use crate::text;

impl Login {
    pub(super) fn operational(
        &mut self,
        keys: &[(String, String)],
        reply: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        let p = &mut self.params;
        let mut declared_mrdsl = false;
        for (k, v) in keys {
            let num = || text::parse_number(v).and_then(|n| u32::try_from(n).ok());
            let yes = || match v.as_str() {
                "Yes" => Ok(true),
                "No" => Ok(false),
                _ => Err(status::INITIATOR_ERROR),
            };
            let answer = match k.as_str() {
                "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias"
                | "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => continue,
                "HeaderDigest" | "DataDigest" => {
                    let pick = v
                        .split(',')
                        .find(|d| *d == "None" || (*d == "CRC32C" && self.cfg.allow_digests))
                        .ok_or(status::INITIATOR_ERROR)?;
                    if k == "HeaderDigest" {
                        p.header_digest = pick == "CRC32C";
                    } else {
                        p.data_digest = pick == "CRC32C";
                    }
                    pick.to_string()
                }
                "MaxRecvDataSegmentLength" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    if !(512..=MAX_BURST_LIMIT).contains(&n) {
                        return Err(status::INITIATOR_ERROR);
                    }
                    p.max_send_data = n;
                    declared_mrdsl = true;
                    continue;
                }
                "MaxBurstLength" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    if !(512..=MAX_BURST_LIMIT).contains(&n) {
                        return Err(status::INITIATOR_ERROR);
                    }
                    p.max_burst = n.min(OUR_MAX_BURST);
                    p.max_burst.to_string()
                }
                "FirstBurstLength" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    if !(512..=MAX_BURST_LIMIT).contains(&n) {
                        return Err(status::INITIATOR_ERROR);
                    }
                    p.first_burst = n.min(OUR_FIRST_BURST);
                    p.first_burst.to_string()
                }
                "ImmediateData" => {
                    p.immediate_data = yes()?;
                    yn(p.immediate_data)
                }
                "InitialR2T" => {
                    // OR: we are happy without it, so the initiator's choice stands.
                    p.initial_r2t = yes()?;
                    yn(p.initial_r2t)
                }
                "DataPDUInOrder" => {
                    yes()?;
                    p.data_pdu_in_order = true;
                    "Yes".into()
                }
                "DataSequenceInOrder" => {
                    yes()?;
                    p.data_sequence_in_order = true;
                    "Yes".into()
                }
                "MaxOutstandingR2T" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    if n == 0 {
                        return Err(status::INITIATOR_ERROR);
                    }
                    p.max_outstanding_r2t = n.min(OUR_MAX_OUTSTANDING_R2T);
                    p.max_outstanding_r2t.to_string()
                }
                "ErrorRecoveryLevel" => {
                    num().ok_or(status::INITIATOR_ERROR)?;
                    "0".into()
                }
                "MaxConnections" => {
                    num().ok_or(status::INITIATOR_ERROR)?;
                    "1".into()
                }
                "DefaultTime2Wait" => {
                    let n = num().ok_or(status::INITIATOR_ERROR)?;
                    p.default_time2wait = n.min(3600);
                    p.default_time2wait.to_string()
                }
                "DefaultTime2Retain" => {
                    num().ok_or(status::INITIATOR_ERROR)?;
                    // Nothing is retained at ErrorRecoveryLevel 0.
                    p.default_time2retain = 0;
                    "0".into()
                }
                "IFMarker" | "OFMarker" => "No".into(),
                "IFMarkInt" | "OFMarkInt" => "Irrelevant".into(),
                _ => "NotUnderstood".into(),
            };
            reply.push((k.clone(), answer));
        }
        if (declared_mrdsl || self.stage == 1)
            && !reply.iter().any(|(k, _)| k == "MaxRecvDataSegmentLength")
        {
            reply.push((
                "MaxRecvDataSegmentLength".into(),
                self.cfg.max_recv_data.to_string(),
            ));
        }
        if p.first_burst > p.max_burst {
            p.first_burst = p.max_burst;
        }
        Ok(())
    }
}

fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.into()
}
