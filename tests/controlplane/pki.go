package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// A client certificate and the kubeconfig that presents it: user and groups as the API server
// reads them (CN and O).
type identity struct {
	file   string
	user   string
	groups []string
}

var identities = []identity{
	{"admin", "kubernetes-admin", []string{"system:masters"}},
	{"scheduler", "system:kube-scheduler", nil},
	{"controller-manager", "system:kube-controller-manager", nil},
}

// writePKI writes what a kubeadm cluster has: a CA, the API server's serving certificate,
// the service-account signing key pair, and a kubeconfig with a client certificate for the
// admin, the scheduler and the controller manager. ECDSA P-256 throughout: fast to generate.
func writePKI(args []string) error {
	flags := flag.NewFlagSet("pki", flag.ContinueOnError)
	dir := flags.String("dir", "", "output directory (required)")
	server := flags.String("server", "", "the API server's URL, for the kubeconfigs (required)")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *server == "" {
		return fmt.Errorf("pki: --dir and --server are required")
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	caKey, err := newKey()
	if err != nil {
		return err
	}
	caTemplate := template("kubernetes-ca", nil)
	caTemplate.IsCA, caTemplate.BasicConstraintsValid = true, true
	caTemplate.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	ca, err := sign(caTemplate, caTemplate, caKey, caKey)
	if err != nil {
		return err
	}
	if err := writePair(*dir, "ca", ca, caKey); err != nil {
		return err
	}
	issuer, err := x509.ParseCertificate(ca)
	if err != nil {
		return err
	}

	serving := template("kube-apiserver", nil)
	serving.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	serving.DNSNames = []string{"localhost", "kubernetes", "kubernetes.default",
		"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	serving.IPAddresses = []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")}
	if err := issue(*dir, "apiserver", serving, issuer, caKey); err != nil {
		return err
	}

	saKey, err := newKey()
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(*dir, "sa.key"), "EC PRIVATE KEY", marshalKey(saKey)); err != nil {
		return err
	}
	public, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(*dir, "sa.pub"), "PUBLIC KEY", public); err != nil {
		return err
	}

	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca})
	for _, id := range identities {
		client := template(id.user, id.groups)
		client.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		der, key, err := keyAndCert(client, issuer, caKey)
		if err != nil {
			return err
		}
		config := clientcmdapi.NewConfig()
		config.Clusters["test"] = &clientcmdapi.Cluster{Server: *server, CertificateAuthorityData: caPEM}
		config.AuthInfos[id.file] = &clientcmdapi.AuthInfo{
			ClientCertificateData: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			ClientKeyData:         pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: marshalKey(key)}),
		}
		config.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: id.file, Namespace: "default"}
		config.CurrentContext = "test"
		if err := clientcmd.WriteToFile(*config, filepath.Join(*dir, id.file+".kubeconfig")); err != nil {
			return err
		}
	}
	return nil
}

func template(name string, groups []string) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name, Organization: groups},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
	}
}

func issue(dir, name string, cert, issuer *x509.Certificate, caKey *ecdsa.PrivateKey) error {
	der, key, err := keyAndCert(cert, issuer, caKey)
	if err != nil {
		return err
	}
	return writePair(dir, name, der, key)
}

// keyAndCert makes a new key and the certificate cert for it, signed by the CA.
func keyAndCert(cert, issuer *x509.Certificate, caKey *ecdsa.PrivateKey) ([]byte, *ecdsa.PrivateKey, error) {
	key, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	der, err := sign(cert, issuer, key, caKey)
	return der, key, err
}

func newKey() (*ecdsa.PrivateKey, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }

func sign(cert, issuer *x509.Certificate, key *ecdsa.PrivateKey, by crypto.Signer) ([]byte, error) {
	return x509.CreateCertificate(rand.Reader, cert, issuer, key.Public(), by)
}

func marshalKey(key *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		panic(err) // a P-256 key always marshals
	}
	return der
}

func writePair(dir, name string, der []byte, key *ecdsa.PrivateKey) error {
	if err := writePEM(filepath.Join(dir, name+".crt"), "CERTIFICATE", der); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, name+".key"), "EC PRIVATE KEY", marshalKey(key))
}

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}
